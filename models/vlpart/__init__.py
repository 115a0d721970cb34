"""VLPart (Sun et al., arXiv 2305.11173): open-vocabulary object and part segmentation."""
from models.vlpart.detector import ConvNeXtFPN, VLPart  # noqa: F401
from models.vlpart.heads import TextClassifier, image_label_loss, largest_proposal, sigmoid_ce  # noqa: F401
