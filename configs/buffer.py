"""MTT expert trajectories (method `buffer`): E experts trained on real data, every epoch's parameters kept.

  python -m calibjax.main --config configs/buffer.py:dataset=cifar10 --workdir runs/buffer_cifar10

Presets (`:key=value,...`): dataset, experts and epochs (0 = the dataset's default below), seed, smoke.
The expert recipe is the reference buffer.py (docs/protocols.md §2.1): SGD without momentum, constant lr 0.01, no
weight decay, batch 256, non-Siamese DSA color_crop_cutout_flip_scale_rotate with MTT's align_corners=True
grids, ConvNet (width 128, instance norm; depth 3, 4 for tiny_imagenet, 5 for imagenette).

- CIFAR-10/100, Tiny ImageNet, ImageNette: the reference budget, 100 experts x 50 epochs on the whole training
  split (less the 500 held-out validation images per class that every calibjax run keeps), ZCA on for CIFAR
  (as the reference's buffer commands; turn it off with --config.data.zca=False for the table rows without
  ZCA). GPU budgets: on a 2-core CPU one such expert takes hours.
- Fashion-MNIST (CPU budget): 5 experts x 30 epochs on a class-balanced 500 images per class (5000 images,
  19 SGD steps per epoch, 2850 steps in all), no ZCA. 30 epochs serve the reference's argparse defaults
  (max_start_epoch 25 + expert_epochs 3 = 28 snapshots needed) and the in-project Fashion-MNIST row (10 + 3).
  One expert took 30 minutes on the 2-core CPU shared with another job (83.9 % test accuracy), so the 5 take
  about 2.5 hours; experiments/fmnist_mtt.sh uses experts=1.
- smoke: 2 experts x 2 epochs of a width-16, depth-2 ConvNet on scikit-learn's digits; seconds.

The distillation run that uses the buffer must have the same data (dataset, normalize, zca) and model
settings; `calibjax.distill.buffer.check_compatible` refuses it otherwise.
"""

import ml_collections

from calibjax import config_lib

# dataset -> (experts, epochs, train_per_class, zca, depth)
_BUDGETS = {
    "cifar10": (100, 50, 0, True, 3),
    "cifar100": (100, 50, 0, True, 3),
    "tiny_imagenet": (100, 50, 0, False, 4),
    "imagenette": (100, 50, 0, False, 5),
    "fashion_mnist": (5, 30, 500, False, 3),
}
_OTHER = (100, 50, 0, False, 3)


def get_config(arg=None):
  preset = config_lib.parse_arg(arg, dataset="fashion_mnist", experts=0, epochs=0, seed=0, smoke=False)
  experts, epochs, train_per_class, zca, depth = _BUDGETS.get(preset.dataset, _OTHER)
  c = config_lib.base_config("buffer")
  c.seed = preset.seed
  c.data.name = preset.dataset
  c.data.zca = zca
  c.data.train_per_class = train_per_class
  c.model.depth = depth

  c.buffer = ml_collections.ConfigDict()
  c.buffer.experts = preset.experts or experts
  c.train = config_lib.train_config(epochs=preset.epochs or epochs, batch_size=256, lr=0.01,
                                    schedule="constant", weight_decay=0.0, momentum=0.0)
  # Every epoch is a snapshot of the trajectory (all checkpointed), and experts are scored on the test split
  # once, after training: the train block's cadence and validation switch have no reader here.
  del c.train.checkpoint_every_epochs, c.train.validate_each_epoch
  c.augment.dsa = True
  c.augment.dsa_align_corners = True

  if preset.smoke:
    config_lib.smoke(c, dataset=config_lib.smoke_dataset(preset.dataset))
    c.data.zca = False
    c.buffer.experts = preset.experts or 2
    c.train.epochs = preset.epochs or 2
  return c
