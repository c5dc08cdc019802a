"""Config helpers: the base config every experiment starts from, and arg-string parsing.

Config files are `configs/<name>.py` with `get_config(arg=None)`; `arg` is the text after the colon
in `--config=configs/mnist_cnn.py:data=tfds,smoke`. Like big_vision's `parse_arg`, `parse` reads
`key=value` pairs and bare flags (`smoke` means smoke=True); each key must be declared with a
default whose type the value is cast to.
"""

import json

import ml_collections
from ml_collections import config_dict

from bigjax.errors import UserError

# config.nan_policy: 'raise' stops at a NaN/Inf loss or gradient norm; 'skip' drops that update.
NAN_POLICIES = ('raise', 'skip')


def _cast(key, text, default):
  if isinstance(default, bool):
    if text.lower() in ('1', 'true', 'yes', ''):
      return True
    if text.lower() in ('0', 'false', 'no'):
      return False
    raise UserError(f'config arg {key}={text!r} is not a boolean; use {key}=true or {key}=false')
  try:
    return type(default)(text)
  except ValueError:
    raise UserError(f'config arg {key}={text!r} is not a {type(default).__name__}') from None


def parse(arg, **defaults):
  """Returns a ConfigDict of `defaults` updated from `arg` ("k=v,flag,...", or None).

  Unknown keys raise UserError listing the known ones.
  """
  args = ml_collections.ConfigDict(dict(defaults))
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    key = key.strip()
    if key not in defaults:
      raise UserError(f'config arg {key!r} is unknown; known args: {", ".join(sorted(defaults))}')
    args[key] = _cast(key, value.strip(), defaults[key])
  return args


def base_config():
  """The fields every experiment config has, with their defaults (experiment files override them).

  Declaring every field here is what lets the command line override any of them with type checks
  (`--config.optim.lr=3e-4`) and lets bigjax reject unknown ones.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  # view: '' reads records as {'inputs', 'label'} arrays; text datasets take 'lm', 'classification'
  # or 'pairs' (see bigjax/data/text.py) with sequences of seq_len tokens, from the 'bytes' tokenizer
  # or a 'sentencepiece' one of vocab_size trained on the train split. eval_max_examples > 0:
  # evaluate on the first N eval examples only. cv_folds K >= 2: K-fold cross-validation inside the
  # train split (fixed fold assignment, stratified by label): train on K-1 folds, evaluate on fold
  # cv_fold (0 <= cv_fold < K) instead of eval_split; 0 = off. name: a TFDS name, dir:PATH (a
  # bigjax-prepare folder) or hf:PATH (a datasets save_to_disk folder). Reading (bigjax/data/
  # inputs.py, loader.py; checked by inputs.check): load 'memory' | 'stream' | 'auto'; image_size
  # > 0 decodes images per example, inception crop (+ left-right flip with image_flip) to train,
  # resize + centre crop to evaluate; grain worker processes (0 = none), reader threads, host
  # batches read ahead (prefetch) and batches moved to the devices ahead (device_prefetch).
  # pack (view 'lm' only): documents tokenized once into a uint16/uint32 token file and read as
  # seq_len windows with segment ids and per-document positions (bigjax/data/packing.py).
  c.data = dict(
    name='mnist5k',
    data_dir=config_dict.placeholder(str),
    train_split='train',
    eval_split='test',
    standardize=False,
    view='',
    pack=False,
    seq_len=128,
    tokenizer='bytes',
    vocab_size=0,
    eval_max_examples=0,
    cv_folds=0,
    cv_fold=0,
    load='auto',
    image_size=0,
    image_flip=True,
    workers=0,
    threads=1,
    prefetch=2,
    device_prefetch=1,
  )
  c.augment = dict(enabled=False, crop_padding=0, flip=False, max_rotate_degrees=0.0, max_scale=0.0)
  c.model = dict(name='cnn', kwargs=ml_collections.ConfigDict())
  c.task = dict(name='classification', kwargs=ml_collections.ConfigDict())
  c.optim = dict(
    name='adam',
    lr=1e-3,
    schedule='constant',
    warmup_steps=0,
    end_lr_fraction=0.0,
    step_boundaries=(0.5, 0.75),
    step_decay=0.1,
    momentum=0.9,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=0.0,
    clip_norm=0.0,
  )
  # Mesh axis sizes (-1 = the rest). On several nodes/slices, axis A has size A * dcn_A: dcn_A ways
  # across slices (multi-slice TPU) or processes (elsewhere), A ways within each; the dcn_* sizes
  # multiply to the number of slices/processes (bigjax/mesh.py). All dcn_* = 1: one flat mesh.
  c.mesh = dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)
  # Multi-process runs: set coordinator_address/num_processes/process_id (one command per process,
  # differing in process_id), or auto=True on TPU pods / MPI; the tasks of a SLURM step (srun,
  # bigjax-launch) need neither (see mesh.initialize_distributed).
  # peer_timeout_s: a peer with no sign of life for this long ends the run with one line
  # (bigjax.preemption.PeerWatch); XLA's own heartbeat abort is set to come later.
  c.distributed = dict(
    coordinator_address='',
    num_processes=1,
    process_id=0,
    auto=False,
    timeout_s=300,
    peer_timeout_s=60,
  )
  # Logical axis -> mesh axes; the first rule whose mesh axes are free and divide the dimension
  # wins (bigjax/mesh.py). Conv kernels are split on their output channels only: XLA:CPU's SPMD
  # partitioner (jax 0.10.2) computed wrong gradients for a conv whose kernel was split on conv_in
  # over 'fsdp' and conv_out over 'tensor' while the batch was split over 'fsdp'
  # (tests/test_train.py guards this).
  c.sharding_rules = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('vocab', 'tensor'),
    ('classes', 'tensor'),
    ('conv_out', ('fsdp', 'tensor')),
    ('conv_out', 'tensor'),
  )
  c.batch_size = 64
  c.grad_accum_steps = 1  # > 1: the batch runs as this many sequential micro-batches, one update
  c.eval_batch_size = 512
  c.num_epochs = 10
  c.num_steps = 0  # > 0 overrides num_epochs
  c.log_every = 50
  c.eval_every = 0  # 0: evaluate at the end only
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.nan_policy = 'raise'  # one of NAN_POLICIES
  # Early stopping on an eval metric (a scalar of the eval report, e.g. 'accuracy' or 'loss'; ''
  # = off; needs eval_every > 0). The best state so far ('max' or 'min' mode, improving by more than
  # min_delta) is kept in workdir/best/ (+ best.json); training stops after `patience` consecutive
  # evals without improvement (0: never stop, only keep the best).
  c.early_stopping = dict(metric='', mode='max', patience=0, min_delta=0.0)
  c.log_grad_norms = False  # True: train metrics add grad_norm/<top-level module> (L2 norms)
  # True: the final eval writes workdir/eval_predictions.npz (labels, scores) for classification.
  c.save_eval_predictions = False
  # (a, b) with 0 <= a < b: a jax.profiler trace of steps a+1..b (after a steps, through step b) in
  # workdir/profile/ (TensorBoard's profile tab or Perfetto read it); () = off.
  c.profile_steps = ()
  # Weights & Biases: project '' = off (wandb is imported only when set); the run logs the same
  # scalars as TensorBoard and the flattened config. WANDB_MODE=offline works without a network.
  c.wandb = dict(project='', entity='', name='')
  # Compression (bigjax/compress/, ranges in RANGES and FRACTIONS below). distill: teacher = a
  # finished run's workdir ('' = off); loss = alpha * task loss + (1 - alpha) * T^2 *
  # KL(teacher_T || student_T), T = temperature > 0; split '' = the KL term on the train batch,
  # else on the same step's batch of that split of the dataset (its labels unread; in-memory image
  # or feature data). prune: method '' (off) | 'magnitude' (the smallest `sparsity` in [0, 1) of
  # the `params`-matching kernels, scope 'global' | 'layer') | 'n_m' (n of every m consecutive
  # inputs of each kernel: prune.input_axes); schedule 'one_shot' (after begin_step updates) |
  # 'gradual' (Zhu & Gupta cubic from begin_step to end_step, every `frequency` steps). quantize:
  # mode '' (off) | 'ptq' | 'qat' through Qwix, weight_dtype / act_dtype ('' = weight-only) in
  # int8 | int4 | fp8, calibration 'absmax' | 'minmax' over calibration_batches train batches,
  # layers = a module-path regex (full match).
  c.distill = dict(teacher='', temperature=4.0, alpha=0.5, split='')
  c.prune = dict(
    method='',
    sparsity=0.5,
    scope='global',
    n=2,
    m=4,
    schedule='one_shot',
    begin_step=1,
    end_step=0,
    frequency=100,
    params='kernel$',
  )
  c.quantize = dict(
    mode='',
    weight_dtype='int8',
    act_dtype='int8',
    calibration='absmax',
    calibration_batches=4,
    layers='.*',
  )
  # Adversarial robustness (bigjax/robust/; checked there, by robust.evaluate.check and
  # robust.adversarial.from_config). Attack fields: method 'fgsm' | 'pgd', norm 'linf' | 'l2',
  # radius eps >= 0 in the model's input units (images in [0, 1]; text: token embeddings); pgd runs
  # `steps` >= 1 of step_size (0 = 2.5 * eps / steps) from a uniform random start in the ball
  # (random_start), best of `restarts` >= 1. eval_attacks: methods () = off, else every method at
  # every eps; each eval reports robust_accuracy_<method>_<norm>_<eps> over the first max_examples
  # eval examples (0 = all). adversarial: method '' = off; the first round(fraction * B) examples of
  # each train batch, fraction in (0, 1], are replaced by attacks on the current model; method
  # 'freelb' (token inputs, fraction 1): FreeLB, the update averages the gradients along its
  # `steps`-step ascent. eps_warmup_steps K > 0 ramps eps linearly from 0 to eps over K steps.
  c.eval_attacks = dict(
    methods=(),
    norm='linf',
    eps=(),
    steps=10,
    step_size=0.0,
    random_start=True,
    restarts=1,
    max_examples=0,
  )
  c.adversarial = dict(
    method='',
    norm='linf',
    eps=0.3,
    steps=10,
    step_size=0.0,
    random_start=True,
    restarts=1,
    fraction=1.0,
    eps_warmup_steps=0,
  )
  # Ensembles (bigjax/ensemble/members.py, checked there): members N >= 1 trains N members in one
  # jitted step (stacked on a leading 'members' axis, which mesh_axis '' keeps replicated or maps to
  # 'data' | 'fsdp' | 'tensor'); the eval averages their probabilities and adds nll, brier, ece and
  # entropy. bigjax-ensemble combines separately trained runs.
  c.ensemble = dict(members=1, mesh_axis='')
  # Fine-tuning: copy parameters matching `load` (comma-separated regexes) from a run's checkpoint,
  # or (hf) from a HuggingFace save_pretrained directory (config.json + safetensors), whose
  # config.json also states the model's architecture fields (config.model.kwargs must not
  # contradict them) and whose tokenizer.json is config.data.tokenizer='hf'. Checked by
  # check_init_from below; read by bigjax/init_from.py.
  c.init_from = dict(checkpoint='', load='.*', hf='')
  # Parameter-efficient fine-tuning (bigjax/peft/; checked by check_peft below and the method):
  # method '' (off) | 'lora' | 'ia3' | 'adapter' | 'adalora' | 'prompt' | 'prefix' freezes the base
  # and trains only the adapter.
  # target: a regex searched in Dense kernel paths ('stack/layer_0/self_attention/query/kernel');
  # rank r >= 1, alpha (the update is scaled by alpha / r), dropout on the adapter's input, dora
  # (DoRA's magnitude and direction). save: 'all' checkpoints the whole train state, 'trainable'
  # only the adapter and its optimizer state (a resume rebuilds the base from config.init_from).
  # init_from: a HF PEFT save_pretrained adapter directory (LoRA, prompt or prefix tuning) put onto
  # the config.init_from.hf base (its adapter_config.json states rank, alpha, dora and the targets,
  # or the number of virtual tokens: bigjax/peft/hf_import.py). quantize: QLoRA, '' (a float
  # base) | 'int8' | 'nf4' frozen kernels of the Dense layers whose module path quantize_layers
  # full-matches (bigjax/peft/qlora.py).
  # method 'ia3': scales on the target layers' outputs, on the inputs of those ia3_feedforward (a
  # regex) matches; 'adapter': a bottleneck MLP of width `bottleneck` on the target layers' outputs.
  # 'adalora': SVD-form updates of initial rank `rank`, pruned to an average target_rank between
  # steps tinit and num_steps - tfinal (every delta_t), importance smoothing beta1 / beta2, the
  # orthogonality regulariser's weight orth_reg (bigjax/peft/adalora.py). 'prompt': virtual_tokens
  # learned embeddings in front of the tokens (bigjax/peft/prompt.py); 'prefix': virtual_tokens
  # learned keys/values in front of every self-attention layer's (bigjax/peft/prefix.py).
  # trainable_base: a regex over base parameter paths that train fully beside the adapter (HF
  # PEFT's modules_to_save: '^classifier/', a head the pretrained model did not have).
  c.peft = dict(
    method='',
    target='self_attention/(query|value)/kernel',
    rank=8,
    alpha=16.0,
    dropout=0.0,
    dora=False,
    save='all',
    init_from='',
    quantize='',
    quantize_layers='.*',
    ia3_feedforward='mlp/wo/kernel',
    bottleneck=16,
    virtual_tokens=20,
    trainable_base='',
    adalora=dict(target_rank=4, tinit=0, tfinal=0, delta_t=1, beta1=0.85, beta2=0.85, orth_reg=0.5),
  )
  # Federated learning, simulated (bigjax/federated/; checked by check_federated below): clients
  # K > 0 turns it on (0 = off) and every step of the run becomes a round of FedAvg (McMahan et
  # al. 2017): config.num_steps rounds (log_every, eval_every and checkpoint_every count rounds);
  # in each, max(1, round(C * K)) clients (C = client_fraction in (0, 1]) drawn from (seed, round)
  # train local_epochs E >= 1 over their own examples in batches of local_batch_size B (0 = all
  # of them: B = inf) with config.optim from a fresh optimizer state (its lr schedule runs over
  # rounds), and the new global parameters are their average weighted by example count. split:
  # 'iid' | 'shards' (sorted by label, shards_per_client single-label shards each) | 'dirichlet'
  # (each label spread over the clients by Dir(alpha), alpha > 0). prox_mu > 0 adds FedProx's
  # (mu / 2) ||w - w_round||^2 to the local loss. FedSGD: local_epochs=1, local_batch_size=0 and
  # config.optim.name='sgd'.
  c.federated = dict(
    clients=0,
    client_fraction=0.1,
    local_epochs=1,
    local_batch_size=10,
    split='iid',
    shards_per_client=2,
    alpha=0.5,
    prox_mu=0.0,
  )
  return c


def check_federated(config) -> None:
  """UserError for the open intervals of config.federated (declared just above): client_fraction
  outside (0, 1], alpha <= 0; the other ranges are in RANGES, the data-dependent checks (more
  clients than examples) in bigjax/federated."""
  fed = config.federated
  if not 0 < fed.client_fraction <= 1:
    raise UserError(
      f'config.federated.client_fraction={fed.client_fraction} must be in (0, 1] (the fraction '
      'C of the clients that train in each round)'
    )
  if fed.alpha <= 0:
    raise UserError(
      f'config.federated.alpha={fed.alpha} must be > 0 (the Dirichlet concentration; small = '
      'more skewed labels)'
    )


PEFT_SAVES = ('all', 'trainable')  # config.peft.save


def check_peft(config) -> None:
  """UserError for config.peft (declared just above): an unknown save mode, save='trainable'
  with no base to rebuild the frozen parameters from (config.init_from), or an adapter to import
  (init_from) without a method that imports one (lora, prompt, prefix) and its base
  (config.init_from.hf)."""
  peft = config.peft
  if peft.save not in PEFT_SAVES:
    raise UserError(
      f'config.peft.save={peft.save!r} is unknown; use one of {", ".join(PEFT_SAVES)}'
    )
  if peft.save == 'trainable' and not (config.init_from.hf or config.init_from.checkpoint):
    raise UserError(
      "config.peft.save='trainable' rebuilds the frozen base from config.init_from on resume, "
      "which is empty; set config.init_from.hf or .checkpoint, or use config.peft.save='all'"
    )
  imports = ('lora', 'prompt', 'prefix')
  if peft.init_from and (peft.method not in imports or not config.init_from.hf):
    raise UserError(
      f'config.peft.init_from={peft.init_from!r} puts a PEFT adapter (LoRA, prompt or prefix '
      "tuning) onto the config.init_from.hf base; set config.peft.method to the adapter's and "
      "config.init_from.hf to its base model directory"
    )


def check_init_from(config) -> None:
  """UserError for config.init_from (declared just above): both a checkpoint and an HF directory,
  a load pattern that is not a regular expression, or tokenizer='hf' without an HF directory."""
  import re

  init = config.init_from
  if init.checkpoint and init.hf:
    raise UserError(
      f'config.init_from.checkpoint={init.checkpoint!r} and config.init_from.hf={init.hf!r} are '
      'both set; start from one of them'
    )
  for pattern in init.load.split(','):
    try:
      re.compile(pattern.strip())
    except re.error as e:
      raise UserError(
        f'config.init_from.load pattern {pattern.strip()!r} is not a regular '
        f'expression ({e}); fix it'
      ) from None
  if config.data.tokenizer == 'hf' and not init.hf:
    raise UserError(
      "config.data.tokenizer='hf' reads the tokenizer.json of config.init_from.hf, which is "
      'empty; set config.init_from.hf=<save_pretrained directory> or choose another tokenizer'
    )


def saved_config(path: str) -> ml_collections.ConfigDict:
  """The config a finished run saved as JSON (`path`: its config.json) laid over today's
  base_config(), so fields added since the run was saved hold their defaults (a method that did
  not exist then is off). JSON lists come back as tuples."""
  with open(path) as f:
    saved = json.load(f)

  def lay(into, values):
    for key, value in values.items():
      if isinstance(value, dict) and isinstance(into.get(key), ml_collections.ConfigDict):
        lay(into[key], value)
      else:
        into[key] = tuple(value) if isinstance(value, list) else value

  config = base_config()
  lay(config, saved)
  return config


def load_config_file(spec):
  """'NAME[:arg]' or 'path/to/name.py[:arg]' -> the ConfigDict its get_config(arg) returns (as
  --config loads it; bare names are the shipped configs, see bigjax.cli.resolve_config)."""
  import importlib.util
  import os

  from bigjax import cli

  path, _, arg = cli.resolve_config(spec).partition(':')
  module_spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def check_config(config, data_parallel: int, processes: int) -> None:
  """Validates the base fields that no component checks by itself (UserError naming the field).

  data_parallel: the mesh's data x fsdp size; processes: jax.process_count()."""
  check_complete(config)
  check_ranges(config)
  for field in ('batch_size', 'eval_batch_size'):
    value = config[field]
    if value <= 0 or value % data_parallel or value % processes:
      raise UserError(
        f'config.{field}={value} is not divisible by the data-parallel size '
        f'{data_parallel} (mesh data x fsdp) and {processes} processes; use a '
        'multiple'
      )
  accum = config.grad_accum_steps
  if accum < 1 or config.batch_size % accum or (config.batch_size // accum) % data_parallel:
    raise UserError(
      f'config.grad_accum_steps={accum} must divide config.batch_size='
      f'{config.batch_size} into micro-batches divisible by the data-parallel size '
      f'{data_parallel}'
    )
  for field in ('log_every', 'checkpoint_every'):
    if config[field] <= 0:
      raise UserError(f'config.{field}={config[field]} must be positive')
  if config.nan_policy not in NAN_POLICIES:
    raise UserError(
      f'config.nan_policy={config.nan_policy!r} is unknown; use one of {", ".join(NAN_POLICIES)}'
    )
  folds, fold = config.data.cv_folds, config.data.cv_fold
  if folds and (folds < 2 or not 0 <= fold < folds):
    raise UserError(
      f'config.data.cv_folds={folds}, cv_fold={fold}: need cv_folds >= 2 and '
      f'0 <= cv_fold < cv_folds (or cv_folds=0 for no cross-validation)'
    )
  if not folds and fold:
    raise UserError(f'config.data.cv_fold={fold} needs config.data.cv_folds >= 2; set both')
  es = config.early_stopping
  if es.metric:
    if config.eval_every <= 0:
      raise UserError(
        f'config.early_stopping.metric={es.metric!r} needs periodic evals; set '
        'config.eval_every > 0'
      )
    if es.mode not in ('max', 'min'):
      raise UserError(f"config.early_stopping.mode={es.mode!r} is unknown; use 'max' or 'min'")
    if es.patience < 0 or es.min_delta < 0:
      raise UserError(
        f'config.early_stopping.patience={es.patience} and min_delta={es.min_delta} must be >= 0'
      )


# (field, lowest allowed value, what it means): every number in base_config with a range.
RANGES = (
  ('optim.lr', 0.0, 'a learning rate'),
  ('optim.clip_norm', 0.0, 'a global-norm bound (0 = no clipping)'),
  ('optim.weight_decay', 0.0, 'a decay rate'),
  ('optim.warmup_steps', 0, 'a step count'),
  ('optim.end_lr_fraction', 0.0, 'a fraction of the learning rate'),
  ('optim.momentum', 0.0, 'a momentum'),
  ('num_steps', 0, 'a step count (0 = use num_epochs)'),
  ('num_epochs', 0, 'an epoch count'),
  ('eval_every', 0, 'a step interval (0 = evaluate at the end only)'),
  ('keep_checkpoints', 1, 'the number of checkpoints kept (at least the newest one)'),
  ('data.eval_max_examples', 0, 'an example count (0 = all)'),
  ('data.image_size', 0, 'a side in pixels (0 = records are fixed-size arrays)'),
  ('data.workers', 0, 'a number of grain worker processes (0 = read in this process)'),
  ('data.threads', 1, 'a number of grain reader threads'),
  ('data.prefetch', 1, 'a number of host batches read ahead'),
  ('data.device_prefetch', 0, 'a number of batches moved to the devices ahead'),
  ('augment.crop_padding', 0, 'a pixel count'),
  ('augment.max_rotate_degrees', 0.0, 'an angle'),
  ('augment.max_scale', 0.0, 'a scale fraction'),
  ('distributed.timeout_s', 1, 'seconds'),
  ('distributed.peer_timeout_s', 1, 'seconds'),
  ('distill.temperature', 0.0, 'a softmax temperature (> 0)'),
  ('prune.begin_step', 1, 'the number of updates before the first pruning'),
  ('prune.end_step', 0, 'a step count'),
  ('prune.frequency', 1, 'a step interval'),
  ('prune.n', 1, 'weights kept per group of m'),
  ('prune.m', 2, 'a group size'),
  ('quantize.calibration_batches', 1, 'a batch count'),
  ('peft.rank', 1, 'a LoRA rank'),
  ('peft.bottleneck', 1, 'an adapter bottleneck width'),
  ('peft.virtual_tokens', 1, 'a number of virtual tokens'),
  ('peft.adalora.tinit', 0, 'a step count'),
  ('peft.adalora.tfinal', 0, 'a step count'),
  ('peft.adalora.delta_t', 1, 'a step interval'),
  ('peft.adalora.orth_reg', 0.0, 'a regulariser weight'),
  ('federated.clients', 0, 'a number of clients (0 = not federated)'),
  ('federated.local_epochs', 1, 'a number of local epochs per round'),
  ('federated.local_batch_size', 0, 'a local batch size (0 = all of a client: B = inf)'),
  ('federated.shards_per_client', 1, 'a number of label shards per client'),
  ('federated.prox_mu', 0.0, "FedProx's proximal weight (0 = FedAvg)"),
)

# (field, whether 1 itself is allowed, what it means): fractions in [0, 1] or [0, 1).
FRACTIONS = (
  ('distill.alpha', True, 'the weight of the task loss'),
  ('prune.sparsity', False, 'the fraction of weights pruned; 1 would prune them all'),
  ('peft.dropout', False, 'the dropout rate of the adapter input'),
  ('peft.adalora.beta1', False, 'an importance smoothing factor'),
  ('peft.adalora.beta2', False, 'an uncertainty smoothing factor'),
)


def _get(config, field: str):
  node = config
  for part in field.split('.'):
    node = node[part]
  return node


def check_ranges(config) -> None:
  """UserError naming the first field of RANGES below its lowest value, a run with nothing to
  train, a bad config.init_from (check_init_from), config.peft (check_peft) or config.federated
  (check_federated)."""
  for field, lowest, what in RANGES:
    value = _get(config, field)
    if value < lowest:
      raise UserError(f'config.{field}={value} must be >= {lowest} ({what})')
  for field, closed, what in FRACTIONS:
    value = _get(config, field)
    if not (0 <= value <= 1 if closed else 0 <= value < 1):
      raise UserError(f'config.{field}={value} must be in [0, 1{"]" if closed else ")"} ({what})')
  if not config.num_steps and not config.num_epochs:
    raise UserError('config.num_steps=0 and config.num_epochs=0: nothing to train; set one of them')
  steps = tuple(config.profile_steps)
  if steps and not (
    len(steps) == 2 and all(isinstance(s, int) for s in steps) and 0 <= steps[0] < steps[1]
  ):
    raise UserError(
      f'config.profile_steps={steps} must be two step numbers (a, b) with 0 <= a < b (the trace '
      'covers the steps after a through b), or () for no trace'
    )
  check_init_from(config)
  check_peft(config)
  check_federated(config)


def flat_fields(tree: dict, prefix: str = '') -> dict:
  """{'a': {'b': 1}, 'c': {}} -> {'a.b': 1, 'c': {}}: a config (as a dict) by dotted field name."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      flat.update(flat_fields(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


# Groups whose fields are the component's own (any kwargs a model or task accepts).
FREE_GROUPS = ('model.kwargs', 'task.kwargs')


def check_complete(config) -> None:
  """UserError naming the first base_config field the config lacks: a group replaced by a dict
  without all its fields (`config.mesh = dict(data=2)`) instead of updated."""
  base = flat_fields(base_config().to_dict())
  have = flat_fields(config.to_dict())
  for field in base:
    if field not in have and not any(field.startswith(g + '.') or field == g for g in FREE_GROUPS):
      group = field.rpartition('.')[0] or 'config'
      raise UserError(
        f'config.{field} is missing (config.{group} was replaced by a dict without it); set the '
        f'fields one by one (config.{group}.x = ...) or with config.{group}.update(...)'
      )
