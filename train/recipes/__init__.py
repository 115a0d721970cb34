"""Built-in recipes; each module registers itself (append yours here)."""
from train.recipes import (cit, clip, dit, fcmae, finetune, linprobe, mae, maskfeat, slip, supervised,  # noqa: F401
                           vlpart)
from train.recipes.base import RECIPES, Recipe, Task, TrainConfig, get, register  # noqa: F401
