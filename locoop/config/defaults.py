"""Default configuration: Dassl.pytorch's keys and defaults plus this project's extensions.

Key names and default values follow Dassl (``dassl/config/defaults.py``) so that the YAML files of
CoOp / LoCoOp / SeTAR merge unchanged. Dassl's trainer-specific sections for domain adaptation and
semi-supervised learning (MCD, DAEL, FixMatch, ...) are not included: no method here uses them.

Extensions beyond Dassl (each marked ``[ext]`` below):

- ``MODEL.DEVICE``, ``TRAIN.DETERMINISTIC``, ``TRAIN.USE_TENSORBOARD``
- ``DATASET.SUBSAMPLE_CLASSES`` (CoOp), ``DATASET.STRICT``, ``DATASET.VAL_SPLIT_FILE``,
  ``DATASET.FEWSHOT_FILE_ORDER``
- ``TRAINER.LOCOOP.*`` (CoOp's keys plus LAMBDA / TOPK, which the LoCoOp code passed as globals)
- ``TRAINER.ZSCLIP.PROMPT_TEMPLATE`` (zero-shot CLIP's class prompt)
- ``OOD.*`` (OOD benchmark evaluation) and ``SETAR.*`` (SeTAR search and fine-tuning)

To add keys, extend the matching ``_add_*`` function; every key needs a default of the type users
will pass (merging checks types against the default) and a comment.
"""
from __future__ import annotations

from yacs.config import CfgNode as _YacsCfgNode

__all__ = ["CfgNode", "get_cfg_default"]


class CfgNode(_YacsCfgNode):
    """yacs ``CfgNode`` whose ``merge_from_file`` / ``merge_from_list`` use this project's checked merge.

    So Dassl-style scripts calling ``cfg.merge_from_file(path)`` get the helpful unknown-key and
    type errors of :mod:`locoop.config` instead of yacs' terse ones.
    """

    def merge_from_file(self, cfg_filename: str) -> None:
        from . import merge_from_file

        merge_from_file(self, cfg_filename)

    def merge_from_list(self, cfg_list: list) -> None:
        from . import merge_from_list

        merge_from_list(self, cfg_list)


CN = CfgNode


def _add_general(c: CN) -> None:
    c.VERSION = 1  # config schema version (Dassl)
    c.OUTPUT_DIR = "./output"  # log.txt, checkpoints and results are written here
    c.RESUME = ""  # directory of a previous run to resume from ("" = resume from OUTPUT_DIR if it has checkpoints)
    c.SEED = -1  # >= 0: fixed seed; < 0: do not seed (random run)
    c.USE_CUDA = True  # use CUDA when available (see MODEL.DEVICE for an explicit device)
    c.VERBOSE = True  # print details (trainer, dataset, model) and show tqdm progress bars


def _add_input(c: CN) -> None:
    c.INPUT = CN()
    c.INPUT.SIZE = (224, 224)  # (height, width) of network inputs
    c.INPUT.INTERPOLATION = "bilinear"  # resize interpolation: bilinear, bicubic or nearest
    c.INPUT.TRANSFORMS = ()  # training transforms by Dassl name, e.g. ["random_resized_crop", "random_flip", "normalize"]
    c.INPUT.NO_TRANSFORM = False  # True: no train/test transforms at all
    c.INPUT.PIXEL_MEAN = [0.485, 0.456, 0.406]  # normalisation mean (ImageNet; CLIP configs override)
    c.INPUT.PIXEL_STD = [0.229, 0.224, 0.225]  # normalisation std (ImageNet; CLIP configs override)
    c.INPUT.CROP_PADDING = 4  # padding of random_crop
    c.INPUT.RRCROP_SCALE = (0.08, 1.0)  # scale range of random_resized_crop
    c.INPUT.CUTOUT_N = 1  # cutout: number of patches
    c.INPUT.CUTOUT_LEN = 16  # cutout: patch side length
    c.INPUT.GN_MEAN = 0.0  # gaussian_noise: mean
    c.INPUT.GN_STD = 0.15  # gaussian_noise: std
    c.INPUT.RANDAUGMENT_N = 2  # randaugment: number of operations
    c.INPUT.RANDAUGMENT_M = 10  # randaugment: magnitude
    c.INPUT.COLORJITTER_B = 0.4  # colorjitter: brightness
    c.INPUT.COLORJITTER_C = 0.4  # colorjitter: contrast
    c.INPUT.COLORJITTER_S = 0.4  # colorjitter: saturation
    c.INPUT.COLORJITTER_H = 0.1  # colorjitter: hue
    c.INPUT.RGS_P = 0.2  # random_gray_scale: probability
    c.INPUT.GB_P = 0.5  # gaussian_blur: probability
    c.INPUT.GB_K = 21  # gaussian_blur: kernel size (odd)


def _add_dataset(c: CN) -> None:
    c.DATASET = CN()
    c.DATASET.ROOT = ""  # folder holding the datasets (imagenet/, iNaturalist/, SUN/, ...)
    c.DATASET.NAME = ""  # registered dataset name, e.g. "ImageNet"
    c.DATASET.SOURCE_DOMAINS = ()  # Dassl: source domain names (unused here)
    c.DATASET.TARGET_DOMAINS = ()  # Dassl: target domain names (unused here)
    c.DATASET.NUM_LABELED = -1  # Dassl: labelled instances for SSL (unused here)
    c.DATASET.NUM_SHOTS = -1  # images per class for few-shot training (-1 or 0: all)
    c.DATASET.VAL_PERCENT = 0.1  # Dassl: SSL validation fraction (unused here)
    c.DATASET.STL10_FOLD = -1  # Dassl: STL-10 fold (unused here)
    c.DATASET.CIFAR_C_TYPE = ""  # Dassl: CIFAR-C corruption (unused here)
    c.DATASET.CIFAR_C_LEVEL = 1  # Dassl: CIFAR-C level (unused here)
    c.DATASET.ALL_AS_UNLABELED = False  # Dassl: SSL option (unused here)
    c.DATASET.SUBSAMPLE_CLASSES = "all"  # [ext, CoOp] all, base or new
    c.DATASET.STRICT = False  # [ext] False: skip corrupt images with a warning; True: fail on them
    c.DATASET.VAL_SPLIT_FILE = ""  # [ext] "" or JSON {wnid: [file names]} defining the validation split
    # [ext] order of each class's training files before few-shot sampling: listdir (os.listdir, as CoOp/LoCoOp:
    # their split for the same seed on the same copy of the data) or sorted (by name: the same split on any copy)
    c.DATASET.FEWSHOT_FILE_ORDER = "listdir"


def _add_dataloader(c: CN) -> None:
    c.DATALOADER = CN()
    c.DATALOADER.NUM_WORKERS = 4  # worker processes per loader
    c.DATALOADER.K_TRANSFORMS = 1  # apply train transforms K times (Dassl)
    c.DATALOADER.RETURN_IMG0 = False  # also return the un-augmented image as img0 (Dassl)
    c.DATALOADER.TRAIN_X = CN()
    c.DATALOADER.TRAIN_X.SAMPLER = "RandomSampler"  # sampler of the labelled train loader
    c.DATALOADER.TRAIN_X.BATCH_SIZE = 32  # training batch size
    c.DATALOADER.TRAIN_X.N_DOMAIN = 0  # Dassl RandomDomainSampler: domains per batch
    c.DATALOADER.TRAIN_X.N_INS = 16  # Dassl RandomClassSampler: instances per class
    c.DATALOADER.TRAIN_U = CN()
    c.DATALOADER.TRAIN_U.SAME_AS_X = True  # Dassl: unlabelled loader copies TRAIN_X settings
    c.DATALOADER.TRAIN_U.SAMPLER = "RandomSampler"  # Dassl: unlabelled loader sampler
    c.DATALOADER.TRAIN_U.BATCH_SIZE = 32  # Dassl: unlabelled batch size
    c.DATALOADER.TRAIN_U.N_DOMAIN = 0  # Dassl: domains per unlabelled batch
    c.DATALOADER.TRAIN_U.N_INS = 16  # Dassl: instances per class (unlabelled)
    c.DATALOADER.TEST = CN()
    c.DATALOADER.TEST.SAMPLER = "SequentialSampler"  # sampler of val/test loaders
    c.DATALOADER.TEST.BATCH_SIZE = 32  # evaluation batch size


def _add_model(c: CN) -> None:
    c.MODEL = CN()
    c.MODEL.INIT_WEIGHTS = ""  # path to weights used to initialise the model
    c.MODEL.DEVICE = ""  # [ext] "" = auto (cuda if available and USE_CUDA, else cpu), or e.g. "cpu", "cuda:1"
    c.MODEL.BACKBONE = CN()
    c.MODEL.BACKBONE.NAME = ""  # CLIP model name ("ViT-B/16", "RN50", ...) or checkpoint path
    c.MODEL.BACKBONE.PRETRAINED = True  # Dassl: load pretrained backbone weights
    # [ext] Prompt checkpoints record their backbone's weight hash and class-name hash; loading one on
    # another backbone / with other class names is refused unless these are True (then a warning).
    c.MODEL.ALLOW_OTHER_BACKBONE = False  # [ext] True: load a prompt checkpoint learned on another backbone
    c.MODEL.ALLOW_OTHER_CLASSNAMES = False  # [ext] True: load a prompt checkpoint learned for other class names
    c.MODEL.HEAD = CN()
    c.MODEL.HEAD.NAME = ""  # Dassl: embedding head name ("" = none)
    c.MODEL.HEAD.HIDDEN_LAYERS = ()  # Dassl: head hidden sizes
    c.MODEL.HEAD.ACTIVATION = "relu"  # Dassl: head activation
    c.MODEL.HEAD.BN = True  # Dassl: head batch norm
    c.MODEL.HEAD.DROPOUT = 0.0  # Dassl: head dropout


def _add_optim(c: CN) -> None:
    c.OPTIM = CN()
    c.OPTIM.NAME = "adam"  # sgd, adam or adamw
    c.OPTIM.LR = 0.0003  # base learning rate
    c.OPTIM.WEIGHT_DECAY = 5e-4  # L2 weight decay (decoupled for adamw)
    c.OPTIM.MOMENTUM = 0.9  # SGD momentum
    c.OPTIM.SGD_DAMPNING = 0  # SGD dampening (Dassl's spelling)
    c.OPTIM.SGD_NESTEROV = False  # SGD Nesterov momentum
    c.OPTIM.RMSPROP_ALPHA = 0.99  # Dassl: rmsprop alpha (rmsprop is not offered here)
    c.OPTIM.ADAM_BETA1 = 0.9  # adam/adamw beta1
    c.OPTIM.ADAM_BETA2 = 0.999  # adam/adamw beta2
    c.OPTIM.STAGED_LR = False  # Dassl: different lr for new layers (not used by these methods)
    c.OPTIM.NEW_LAYERS = ()  # Dassl: names of new layers for STAGED_LR
    c.OPTIM.BASE_LR_MULT = 0.1  # Dassl: lr multiplier of base layers for STAGED_LR
    c.OPTIM.LR_SCHEDULER = "single_step"  # single_step, multi_step or cosine (stepped once per epoch)
    c.OPTIM.STEPSIZE = (-1,)  # decay epochs; single_step: -1 or 0 means MAX_EPOCH
    c.OPTIM.GAMMA = 0.1  # decay factor of single_step / multi_step
    c.OPTIM.MAX_EPOCH = 10  # number of training epochs
    c.OPTIM.WARMUP_EPOCH = -1  # > 0 enables warm-up for this many epochs
    c.OPTIM.WARMUP_TYPE = "linear"  # constant or linear
    c.OPTIM.WARMUP_CONS_LR = 1e-5  # lr during constant warm-up
    c.OPTIM.WARMUP_MIN_LR = 1e-5  # lr of the first epoch of linear warm-up
    c.OPTIM.WARMUP_RECOUNT = True  # True: the main schedule starts counting after warm-up


def _add_train_test(c: CN) -> None:
    c.TRAIN = CN()
    c.TRAIN.CHECKPOINT_FREQ = 0  # save every N epochs (<= 0: only the last epoch)
    # [ext] rewrite <model>/model-last.pth.tar after every epoch that writes no numbered checkpoint, so a killed
    # run resumes from its last finished epoch whatever CHECKPOINT_FREQ is (deleted when a numbered one is written)
    c.TRAIN.SAVE_LAST = True
    c.TRAIN.PRINT_FREQ = 10  # print the training line every N batches
    c.TRAIN.COUNT_ITER = "train_x"  # Dassl: which loader defines an epoch's length
    c.TRAIN.DETERMINISTIC = False  # [ext] deterministic algorithms (slower; cuDNN benchmark off)
    c.TRAIN.USE_TENSORBOARD = False  # [ext] write tensorboard scalars to OUTPUT_DIR (needs `tensorboard`)

    c.TEST = CN()
    c.TEST.EVALUATOR = "Classification"  # registered evaluator name
    c.TEST.PER_CLASS_RESULT = False  # also report per-class accuracy
    c.TEST.COMPUTE_CMAT = False  # save the confusion matrix to OUTPUT_DIR/cmat.pt
    c.TEST.NO_TEST = False  # skip testing after training
    c.TEST.SPLIT = "test"  # split for the final evaluation: test or val
    c.TEST.FINAL_MODEL = "last_step"  # last_step, or best_val (validate each epoch, test the best)


def _add_trainer(c: CN) -> None:
    c.TRAINER = CN()
    c.TRAINER.NAME = ""  # registered trainer name, e.g. "LoCoOp"

    # [ext] LoCoOp (CoOp's keys; CoOp is LoCoOp with LAMBDA 0)
    c.TRAINER.LOCOOP = CN()
    c.TRAINER.LOCOOP.N_CTX = 16  # number of learned context vectors
    c.TRAINER.LOCOOP.CSC = False  # class-specific context
    c.TRAINER.LOCOOP.CTX_INIT = ""  # initialise the context from these words ("" = random)
    c.TRAINER.LOCOOP.PREC = "fp16"  # fp16, fp32 or amp
    c.TRAINER.LOCOOP.CLASS_TOKEN_POSITION = "end"  # end, middle or front
    c.TRAINER.LOCOOP.LAMBDA = 0.25  # weight of the local OOD regularisation (paper's --lambda_value)
    c.TRAINER.LOCOOP.TOPK = 200  # a patch is OOD if its label is not in its top-K classes (paper's --topk)

    # [ext] zero-shot CLIP (trainer ZeroshotCLIP)
    c.TRAINER.ZSCLIP = CN()
    # class prompt, "{}" = class name: CoOp's ZeroshotCLIP ImageNet template; MCM / GL-MCM use "a photo of a {}"
    c.TRAINER.ZSCLIP.PROMPT_TEMPLATE = "a photo of a {}."


def _add_ood(c: CN) -> None:
    # [ext] OOD benchmark evaluation
    c.OOD = CN()
    c.OOD.DATASETS = ["iNaturalist", "SUN", "Places", "Texture"]  # OOD sets under DATASET.ROOT
    c.OOD.SCORES = ["MCM", "GL-MCM", "L-MCM", "energy", "max-logit", "entropy", "variance"]  # scores to report
    c.OOD.T = 1.0  # softmax temperature on cosine similarities (MCM's T)
    c.OOD.LAMBDA_LOCAL = 1.0  # GL-MCM = MCM + LAMBDA_LOCAL * L-MCM (GL-MCM's --lambda_local; its ImageNet script: 0.5)
    c.OOD.FPR_CONVENTION = "mcm"  # mcm (ID positive, TPR closest to 0.95) or openood (OOD positive)
    c.OOD.PLOT = True  # write score-distribution histograms
    c.OOD.CACHE_DIR = ""  # image-feature cache folder ("" = $LOCOOP_FEATURE_CACHE, else ~/.cache/locoop/features)
    c.OOD.USE_CACHE = True  # reuse cached image features
    c.OOD.CACHE_LOCAL_DTYPE = "float16"  # local features in the cache: float16 (half the disk) or float32 (exact)
    # image-list benchmark instead of OOD folders: "" (folders of OOD.DATASETS under DATASET.ROOT) or
    # openood_v1.5_imagenet (OpenOOD's benchmark_imglist/ lists; OOD.DATASETS then names its lists; tables near / far)
    c.OOD.BENCHMARK = ""
    c.OOD.BOOTSTRAP = 0  # >= 2: bootstrap replicates over images per run, intervals written into ood_results.*; 0 = off
    c.OOD.BOOTSTRAP_SEED = 0  # seed of numpy.random.default_rng for those replicates
    # negative-label scores NegLabel / CSP (OOD.SCORES "['MCM', 'NegLabel']"): defaults = the papers' code
    c.OOD.NEGLABEL = CN()
    # word list the negative labels are mined from: WordNet's dict/ folder (NLTK's wordnet corpus, Debian's
    # wordnet-base: /usr/share/wordnet), NegLabel's txtfiles/ folder, or a one-word-per-line file ("" = none)
    c.OOD.NEGLABEL.LEXICON = ""
    c.OOD.NEGLABEL.LEXICON_FORMAT = "auto"  # auto (detected), wordnet, neglabel or words
    c.OOD.NEGLABEL.RATIO = 0.15  # fraction of each part of speech kept as negative labels (NegLabel's neg_topk)
    c.OOD.NEGLABEL.PERCENTILE = 0.95  # quantile of a word's cosines to the ID labels; the smallest are kept
    c.OOD.NEGLABEL.NGROUP = 100  # groups of the grouping strategy (<= 1: one softmax over all negatives)
    c.OOD.NEGLABEL.GROUP_SEED = 0  # seed of the permutation that forms the groups (torch.randperm)
    c.OOD.NEGLABEL.PERM_DEVICE = ""  # device type the permutation is drawn on: "" = the evaluation device, cpu, cuda
    c.OOD.NEGLABEL.T = 0.01  # temperature tau of the score on cosines (the code's t = 1 on 100 * cos)
    # ID labels of the score: auto (the recipe's own prompts, "the nice {}" / CSP's 8, for hand-written class
    # prompts; the trainer's text features for learned prompts: LoCoOp, CoOp), recipe, or trainer
    c.OOD.NEGLABEL.ID_TEXT = "auto"
    c.OOD.NEGLABEL.TEXT_BATCH = 1000  # prompts per text-encoder pass while encoding the candidate words


def _add_setar(c: CN) -> None:
    # [ext] SeTAR: training-free low-rank pruning search, and SeTAR+FT
    c.SETAR = CN()
    c.SETAR.SEARCHER = "visual_text"  # layer order of the greedy search
    c.SETAR.WEIGHT_TYPES = ["W_up"]  # matrices searched per block (W_q, W_k, W_v, W_o, W_up, W_down)
    c.SETAR.PRUNE_TYPE = "small"  # remove the smallest singular components (large/random: ablations)
    c.SETAR.RATIOS = [0.0, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.35, 0.40]  # candidate pruning ratios
    c.SETAR.LAMBDA = 0.10  # weight of the local OOD term in the search criterion
    c.SETAR.TOPK = 300  # top-K of the local OOD term in the search criterion
    c.SETAR.FREEZE_PROJ = True  # do not search the towers' final projections (W_p)
    c.SETAR.MODE = "fast"  # fast (cached prefixes) or naive (recompute everything)
    c.SETAR.CRITERION = "loss"  # loss, or an OOD metric when OOD_VAL_DATASETS is given
    c.SETAR.SETTINGS_FILE = ""  # JSON of searched ratios to load instead of searching
    c.SETAR.OOD_VAL_DATASETS = []  # OOD validation sets for a metric criterion
    c.SETAR.SCORE = "GL-MCM"  # score used by metric criteria and the final benchmark
    c.SETAR.CACHE_GB = 8.0  # fast search: memory budget of cached block inputs (above it every k-th is kept; exact)
    # zero-shot class prompt of the search and the benchmark: SeTAR's own ("a photo of a {}", no full stop,
    # both datasets: its model_hub / test_ood.py); "a photo of a {}." (CoOp's) is an opt-in departure
    c.SETAR.PROMPT_TEMPLATE = "a photo of a {}"
    c.SETAR.FT = CN()
    c.SETAR.FT.ADAPTER = "setar"  # setar (ranks and init from the search) or lora (baseline)
    c.SETAR.FT.LORA_RANK = 8  # rank of plain LoRA adapters
    c.SETAR.FT.LORA_ALPHA = 8  # LoRA alpha of plain LoRA adapters (scaling alpha / rank)
    c.SETAR.FT.LORA_DROPOUT = 0.0  # dropout on the LoRA input
    c.SETAR.FT.LAMBDA = 0.10  # weight of the local OOD term of the fine-tuning loss (SeTAR's locoop_lambda)
    c.SETAR.FT.TOPK = 300  # top-K of the local OOD term of the fine-tuning loss (SeTAR's locoop_top_k)
    c.SETAR.FT.PREC = "fp32"  # fp32 (SeTAR's) or amp (fp16 autocast on CUDA); weights and SVD stay fp32
    c.SETAR.FT.TRAIN_SPLIT = "train"  # train: few-shot train_x (NUM_SHOTS); val: the ID validation split (SeTAR's)
    c.SETAR.FT.LR_STEP = "iter"  # iter: schedule per optimiser step (SeTAR's); epoch: per epoch (Dassl)
    # class prompt SeTAR+FT / LoRA train and evaluate with: SeTAR's finetune.py's "a photo of a {}";
    # "" = the search's SETAR.PROMPT_TEMPLATE
    c.SETAR.FT.PROMPT_TEMPLATE = "a photo of a {}"


def _build_defaults() -> CN:
    c = CN()
    for add in (_add_general, _add_input, _add_dataset, _add_dataloader, _add_model, _add_optim,
                _add_train_test, _add_trainer, _add_ood, _add_setar):
        add(c)
    return c


_C = _build_defaults()


def get_cfg_default() -> CN:
    """Return a fresh, mutable copy of the full default config.

    Returns:
        A new ``yacs.config.CfgNode``; changing it never affects later calls.
    """
    return _C.clone()
