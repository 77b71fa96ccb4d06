"""Knowledge distillation (method `kd`): a student trained from a finished `train` or `kd` run, calibrated.

  python -m calibjax.main --config configs/kd.py:recipe=kd_uc,teacher=runs/c100_resnet32x4_ce \\
      --workdir runs/c100_kd_uc_resnet8x4

Presets (`:key=value,...`):
  recipe: what the run reproduces; it picks the defaults of student, loss and mixing.
    kd_c   KD(C), paper 003: the teacher was trained with a calibration method (a `train` run with loss=mdca,
           focal_mdca, label_smoothing, focal, mmce, adafocal or mixing=mixup); loss cxkd (T 20, alpha 0.9).
    kd_uc  KD(UC), its baseline: the same student loss from an NLL (loss=ce) teacher.
    aug    paper 004: loss scaled_kd (class-mean KL, T 50, alpha 0.5) on the original sample + the student's
           augmentation loss; mixing mixup with Beta(0.4, 0.4) by default (or cutmix: 1 box, probability 0.5;
           cutout: 1 hole of half the image side, 16 px at 32 px). The teacher sees originals only.
    reverse  reverse KD: a small teacher (e.g. resnet8x4) teaches a larger student (default resnet32x4);
           loss kd.
    self   self-distillation: the student has the teacher's architecture (pass student=<teacher's model>);
           loss kd.
  teacher: the teacher's --workdir (a finished train or kd run; required).
  teacher_cal: none | ts | mts: divide the teacher's logits by the temperature its own run fitted (post-hoc
    calibrated teacher for KD(C), paper 003's "TS" teacher); default none.
  student: a model of the zoo (calibjax.models.MODELS); "" = the small model of the dataset's pair (CIFAR-100:
    resnet8x4, Fashion-MNIST: wrn_16_2), the large one (resnet32x4, wrn_40_2) for recipe=reverse.
  loss: kd | scaled_kd | cxkd | crd | rkd (`calibjax.kd.objective.KD_LOSSES`); "" = the recipe's.
    rkd = Relational KD as RepDistiller's RKD recipe (-r 1 -a 0 -b 1: CE + RKD on the penultimate features,
    distance and angle weights 25 and 50; `kd.rkd`). crd = Contrastive Representation Distillation
    (RepDistiller's CRD recipe, -r 1 -a 0 -b 0.8: CE + 0.8 · CRD, no KD term), with any recipe; its settings
    are `kd.crd`: weight 0.8, feat_dim 128, nce_k 16384 (clipped to n_train - largest class count: 1 030 on
    the digits smoke data), nce_t 0.07, nce_m 0.5 (--config.kd.crd.weight=... to change them).
  mixing: none | mixup | cutmix | cutout; "" = the recipe's.
  alpha, temperature: weight of the distillation term and KD temperature; -1 = the loss's default
    (kd: 0.9, 4 as RepDistiller; scaled_kd: 0.5, 50 as paper 004; cxkd: 0.9, 20 as CalibrationXferViaKD;
    crd: 0, 4, the weight of a Hinton KD term added to CE + CRD).
  dataset: cifar100 (default) | fashion_mnist | any other name calibjax.data.load knows (Fashion-MNIST's
    budget then).
  epochs: 0 = the dataset's default (240 on CIFAR-100, 15 on Fashion-MNIST).
  train_per_class: > 0 trains on a class-balanced subset (0 = the dataset's default).
  seed; smoke: a seconds-long run on scikit-learn's digits with a width-reduced resnet8 student (for tests).

CIFAR-100 = the RepDistiller recipe: SGD momentum 0.9, wd 5e-4, batch 64, lr 0.05 (0.01 for mobilenetv2,
shufflev1, shufflev2 students), 240 epochs, lr x0.1 at 150/180/210 (milestones scaled by epochs/240 when
`epochs` is changed); 50 images per class held out as the validation split for TS/MTS (10 %, as
CalibrationXferViaKD); random crop with 4-pixel black padding + horizontal flip (`augment.crop_flip`, on for
CIFAR-10 / CIFAR-100 as both papers' recipes; teacher and student see the same crop). Paper 004 trains with lr
0.1 and cosine annealing instead: add `--config.train.lr=0.1 --config.train.schedule=cosine`. DSA
(`--config.augment.dsa=True`) can be added to the base augmentation both networks see.

Fashion-MNIST = the CPU budget: wrn_16_2 student (the zoo pair wrn_40_2 -> wrn_16_2 scaled to 28 px),
1000 training images per class, 15 epochs, batch 128, lr 0.05 x0.1 at epochs 9/11/13 (the RepDistiller
milestones scaled); about half an hour per student on 2 CPU cores with a wrn_40_2 teacher (an estimate from
the models' FLOPs). Its teacher is a `train` run of wrn_40_2 with the same protocol and data
(`configs/train.py:protocol=kd,model=wrn_40_2`), with loss=ce for KD(UC) or a calibration loss for KD(C).
The teacher must use the student's data settings (name, normalize, zca) and, to keep the student's validation
split unseen by the teacher, the same seed and data.val_per_class.

Iterative self-distillation over G generations: generation g + 1 is a `kd` run whose teacher is generation g.
  prev=runs/fm_wrn16_gen0   # a finished train run of the student architecture
  for g in 1 2 3; do
    python -m calibjax.main \\
        --config configs/kd.py:recipe=self,dataset=fashion_mnist,student=wrn_16_2,teacher=$prev \\
        --workdir runs/fm_wrn16_gen$g
    prev=runs/fm_wrn16_gen$g
  done
"""

import ml_collections

from calibjax import config_lib
from calibjax.errors import ConfigError

RECIPES = {  # recipe -> (loss, mixing, whether the student is the larger model of the dataset's pair)
    "kd_c": ("cxkd", "none", False),
    "kd_uc": ("cxkd", "none", False),
    "aug": ("scaled_kd", "mixup", False),
    "reverse": ("kd", "none", True),
    "self": ("kd", "none", False),
}


def get_config(arg=None):
  preset = config_lib.parse_arg(arg, recipe="kd_uc", teacher="", student="", loss="", mixing="", alpha=-1.0,
                                temperature=-1.0, teacher_cal="none", dataset="cifar100", epochs=0,
                                train_per_class=0, seed=0, smoke=False)
  if preset.recipe not in RECIPES:
    raise ConfigError(f"unknown recipe '{preset.recipe}'; choose one of: {', '.join(RECIPES)}")
  loss, mixing, large_student = RECIPES[preset.recipe]
  loss, mixing = preset.loss or loss, preset.mixing or mixing
  from calibjax.kd.objective import KD_LOSSES  # Imported here: only kd configs need the KD library.
  entry = KD_LOSSES.get(loss)
  pair = config_lib.KD_PROTOCOLS.get(preset.dataset, config_lib.KD_PROTOCOLS["fashion_mnist"])[-1]
  student = preset.student or pair[large_student]

  c = config_lib.base_config("kd")
  c.seed = preset.seed
  c.data.name = preset.dataset
  c.train, per_class, c.data.val_per_class = config_lib.kd_protocol(preset.dataset, model=student,
                                                                    epochs=preset.epochs)
  c.data.train_per_class = preset.train_per_class or per_class

  c.kd = ml_collections.ConfigDict()
  c.kd.recipe = preset.recipe
  c.kd.teacher = preset.teacher
  c.kd.teacher_calibration = preset.teacher_cal
  c.kd.loss = loss
  c.kd.alpha = entry.alpha if preset.alpha < 0 else preset.alpha
  c.kd.temperature = entry.temperature if preset.temperature < 0 else preset.temperature
  if entry.relation:  # crd or rkd: the settings of the relation term (weight, ...)
    c.kd[entry.relation] = ml_collections.ConfigDict(entry.relation_defaults)

  c.augment.mixing = mixing
  if preset.recipe == "aug":
    c.augment.mixup_alpha = 0.4  # paper 004's Beta(0.4, 0.4); CutMix keeps Beta(1, 1), probability 0.5

  if preset.smoke:
    config_lib.smoke(c, dataset="digits" if preset.dataset in config_lib.KD_PROTOCOLS else preset.dataset)
    c.train.milestones = ()
    if not preset.student:
      student = "resnet8"
  c.augment.crop_flip = c.data.name in config_lib.KD_CROP_FLIP_DATASETS  # after smoke: digits are not flipped
  if student == "convnet":
    c.model.name = "convnet"  # keeps the base config's (or smoke's) ConvNet fields
  else:
    c.model = ml_collections.ConfigDict({"name": student})
    if preset.smoke and not preset.student:
      c.model.widths = (8, 8, 16, 16)  # a width-reduced resnet8: seconds on digits
  return c
