"""Built-in recipes; each module registers itself (append yours here)."""
from train.recipes import cit, clip, dit, fcmae, mae, maskfeat, slip, supervised, vlpart  # noqa: F401
from train.recipes.base import RECIPES, Recipe, Task, TrainConfig, get, register  # noqa: F401
