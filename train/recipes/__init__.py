"""Built-in recipes; each module registers itself (append yours here)."""
from train.recipes import supervised  # noqa: F401
from train.recipes.base import RECIPES, Recipe, Task, TrainConfig, get, register  # noqa: F401
from train.recipes import clip  # noqa: F401,E402
from train.recipes import slip, cit  # noqa: F401,E402
