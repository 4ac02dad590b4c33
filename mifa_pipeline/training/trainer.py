"""The training loop: a VAE phase (when the model has no trained VAE), then the joint MAUGen phase.

Resumability: every random draw of step ``s`` comes from generators seeded by (seed, phase, s), and a
checkpoint holds the weights (our model folder), the raw weights behind the EMA, the optimizer state, the
MRL heads and the decoder phase's patch critic with its optimizer (safetensors, tensors only) plus a JSON
of counters; so a resumed run draws the same batches and noise as an uninterrupted one and, on the same
machine and thread count, continues bit for bit.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mifa_pipeline.maugen import MAUGen, configs

from . import latent_cache, setup
from .adversarial import CRITIC_BETAS, CRITIC_LR, PatchDiscriminator, critic_loss, generator_loss
from .data import ATTRIBUTES_FILE, FaceData, load_data
from .losses import expression_weights, focal_mse, info_nce, multilabel_focal, weighted_mean
from .tokenizer import write_word_tokenizer

ID_PLACEHOLDER = "<ID> <ID2>"
CHECKPOINT_PATTERN = re.compile(r"^(vae|step|dec)-(\d{7})$")  # VAE phase, main phase, decoder phase
PHASE_ORDER = {"vae": 0, "step": 1, "dec": 2}
STATE_FILE = "training_state.safetensors"
TRAINER_FILE = "trainer.json"

# Words a build's prompts may hold that a teacher data set never says (manifest default demographics and
# negative prompt); they go into the learnt vocabulary, and the demographics are mixed into training
# prompts so the model learns to ignore them (the teacher's look does not depend on them).
AGES = ("young adult", "adult", "middle-aged", "elderly")
GENDERS = ("woman", "man")
ETHNICITIES = ("East Asian", "South Asian", "Black", "White", "Hispanic", "Middle Eastern", "Southeast Asian")
DEFAULT_NEGATIVE = (
    "deformed, distorted, disfigured, cartoon, 3d render, low quality, blurry, jpeg artifacts, "
    "plastic skin, blotchy skin, exaggerated wrinkles, over-exaggerated expression"
)


@dataclass
class TrainConfig:
    data: list[str]
    out: str
    base: str | None = None
    init: str | None = None
    config: str = "tiny"
    resolution: int = 64
    steps: int = 1000
    vae_steps: int | None = None            # default: 0 when the model has a VAE, else max(100, steps // 8)
    batch_size: int = 16
    vae_batch_size: int | None = None
    decoder_steps: int = 0                   # phase 3: VAE decoder only (encoder and latent space frozen)
    lr: float = 5e-4
    vae_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema: float = 0.999                       # 0 disables the EMA
    ema_warmup: int = 100                    # EMA decay ramps in: min(ema, (1 + s) / (10 + s)) after this many steps
    train_text_encoder: bool | None = None   # default: yes from scratch, no from --base / --init
    identity_input: str | None = None        # frame | mask_region (default: what the model or preset says)
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    validate_every: int = 0                  # 0: only at the end
    val_data: list[str] = field(default_factory=list)
    val_identities: int = 4                  # held out of the training data when no --val-data is given
    val_samples: int = 8
    val_steps: int = 20
    guidance_scale: float = 7.5
    device: str = "auto"
    mixed_precision: str = "no"
    seed: int = 0
    threads: int | None = None
    paint_prob: float = 0.2                  # rows drawn as whole frames (no canvas, no identity)
    cond_drop_prob: float = 0.1              # rows with the empty / negative prompt (classifier-free guidance)
    id_swap_prob: float = 0.3                # identity input = another image of the same identity
    demographics_prob: float = 0.5           # "a person" -> "a <age> <ethnicity> <gender>" in prompts
    occurrence_threshold: float = 2.0        # occurrence label = intensity >= this (DISFA protocol)
    occ_gamma: float = 2.0
    int_gamma: float = 2.0
    w_occ: float = 1.0
    w_int: float = 1.0
    aux_weight: float = 0.5                  # deep supervision: weight of the non-final levels (0 disables)
    w_mrl: float = 0.05
    mrl_colour_jitter: float = 0.0           # colour gain/offset range of the identity MRL views (0: off)
    mrl_temperature: float = 0.1
    identity_attribute_weight: float = 0.0   # <ID> words -> the data's identity_attributes.parquet (0: off)
    identity_image_weight: float = 0.0       # the predicted clean image -> the same attributes (0: off)
    kl_weight: float = 1e-6
    vae_expression_weight: float = 0.0      # VAE/decoder loss weight of pixels an AU moved (0: plain mean)
    diffusion_expression_weight: float = 0.0  # the same for the diffusion loss, on the latent grid
    decoder_adversarial_weight: float = 0.0  # decoder phase: weight of a patch critic's hinge loss (0: off)
    max_time_s: float | None = None          # stop (with a checkpoint) after this many seconds
    vae: str | None = None                   # a trained VAE (our or a diffusers folder): no VAE phase; with init: the model moves to it
    prediction_type: str | None = None       # epsilon | v_prediction; default: v_prediction from scratch, else the model's
    zero_snr: bool | None = None             # zero terminal SNR betas + trailing spacing; default: on from scratch
    resume: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) % (2**63) for p in parts]).generate_state(1, dtype=np.uint64)[0] % (2**63))


def colour_jitter(faces: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Each face with its own random per-channel gain (1 +- strength) and offset (+- strength / 2).

    For the identity MRL term only: two views of one person then differ in colour, so matching them needs
    the face's shape; without it the term is solved by skin, hair and background colours alone."""
    if strength <= 0:
        return faces
    b = faces.shape[0]
    gain = 1 + strength * (2 * torch.rand(b, 3, 1, 1, generator=generator) - 1)
    offset = strength / 2 * (2 * torch.rand(b, 3, 1, 1, generator=generator) - 1)
    return (faces * gain.to(faces.device) + offset.to(faces.device)).clamp(0, 1)


def lr_at(step: int, total: int, base: float, warmup: int, min_ratio: float, time_progress: float = 0.0) -> float:
    """Linear warm-up, then cosine to ``min_ratio``; ``time_progress`` (elapsed / --max-time) can only
    advance the schedule, so a run stopped by its time budget still ends at the low learning rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), time_progress))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA device")
    return torch.device(name)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float().div(255.0)


def strip_placeholder(prompt: str) -> str:
    return prompt.replace(f"{ID_PLACEHOLDER}, ", "").replace(ID_PLACEHOLDER, "").strip()


def augment_demographics(prompt: str, rng: np.random.Generator) -> str:
    if "a person" not in prompt:
        return prompt
    words = f"a {AGES[rng.integers(len(AGES))]} {ETHNICITIES[rng.integers(len(ETHNICITIES))]} {GENDERS[rng.integers(2)]}"
    return prompt.replace("a person", words, 1)


def vocabulary_texts(data: FaceData) -> list[str]:
    """The corpus the word tokenizer learns from: every prompt plus the words builds may add."""
    from mifa_pipeline.aus import AU_PHRASES, FACS_NAMES, INTENSITY_ADJECTIVES, INTENSITY_ADVERBS

    extra = [DEFAULT_NEGATIVE, " ".join(AGES), " ".join(GENDERS), " ".join(ETHNICITIES)]
    extra += list(FACS_NAMES.values()) + list(INTENSITY_ADJECTIVES.values())
    extra += [p.format(adv=a) for p in AU_PHRASES.values() for a in INTENSITY_ADVERBS.values()]
    return list(data.prompts) + list(data.ref_prompts) + extra


class Logger:
    def __init__(self, path: Path, echo: Callable[[str], None] | None = print):
        self.path, self.echo = path, echo

    def log(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")
        if self.echo:
            parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                     if k not in ("time", "per_au") and not isinstance(v, (dict, list))]
            self.echo(" ".join(parts))


class EMA:
    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float, warmup: int):
        self.decay, self.warmup = decay, warmup
        self.shadow = {k: p.detach().clone() for k, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.nn.Parameter], step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step)) if step >= self.warmup else 0.0
        for k, p in params.items():
            self.shadow[k].mul_(d).add_(p.detach(), alpha=1 - d)

    @contextmanager
    def applied(self, params: dict[str, torch.nn.Parameter]):
        raw = {k: p.detach().clone() for k, p in params.items()}
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(self.shadow[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(raw[k])


@torch.no_grad()
def realign(model: torch.nn.Module) -> torch.nn.Module:
    """Re-allocate every parameter and buffer. Tensors read from safetensors can sit at unaligned
    addresses, and CPU GEMM kernels then round differently than on freshly allocated memory; after this a
    loaded model computes bit for bit what the model that was saved computed (resume, --init)."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                p.data = p.data.clone()
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = b.clone()
    return model


# --------------------------------------------------------------------------- optimizer state <-> tensors
def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str = "opt") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            tensors[f"{prefix}/{idx}/{k}"] = t.detach().contiguous().cpu()
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                   prefix: str = "opt") -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not key.startswith(f"{prefix}/"):
            continue
        _, idx, name = key.split("/", 2)
        state.setdefault(int(idx), {})[name] = t
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# --------------------------------------------------------------------------- the trainer
class Trainer:
    def __init__(self, cfg: TrainConfig, echo: Callable[[str], None] | None = print):
        for flag, value in (("--vae-expression-weight", cfg.vae_expression_weight),
                            ("--diffusion-expression-weight", cfg.diffusion_expression_weight),
                            ("--decoder-adversarial-weight", cfg.decoder_adversarial_weight),
                            ("--identity-attribute-weight", cfg.identity_attribute_weight),
                            ("--identity-image-weight", cfg.identity_image_weight)):
            if not value >= 0:  # also refuses NaN
                raise ValueError(f"{flag} must be >= 0 (0: off), got {value}")
        if cfg.identity_image_weight > 0 and not cfg.identity_attribute_weight > 0:
            raise ValueError(f"--identity-image-weight {cfg.identity_image_weight} judges images with the attribute "
                             "head that --identity-attribute-weight trains: give that weight too (e.g. 0.2)")
        if cfg.identity_attribute_weight > 0:
            lacking = [f for f in cfg.data if not (Path(f) / ATTRIBUTES_FILE).is_file()]
            if lacking:
                raise ValueError(f"--identity-attribute-weight {cfg.identity_attribute_weight} needs per-identity "
                                 f"attributes in every data folder (`mifa teacher` writes {ATTRIBUTES_FILE}); "
                                 f"missing in: {', '.join(lacking)}")
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "checkpoints").mkdir(exist_ok=True)
        self.logger = Logger(self.out / "train_log.jsonl", echo)
        self.echo = echo or (lambda s: None)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        if cfg.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"--mixed-precision must be no, fp16 or bf16, got {cfg.mixed_precision!r}")
        if cfg.mixed_precision == "fp16" and self.device.type != "cuda":
            raise ValueError("--mixed-precision fp16 needs a CUDA device (use bf16 or no on CPU)")
        self.amp_dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
        self.scaler = torch.amp.GradScaler("cuda") if cfg.mixed_precision == "fp16" else None
        self.start_time = time.time()

    # ------------------------------------------------------------------ data + model
    def _load(self) -> None:
        cfg = self.cfg
        self.echo(f"loading data: {', '.join(cfg.data)}")
        data = load_data(cfg.data, cfg.resolution)
        if cfg.val_data:
            self.val = load_data(cfg.val_data, cfg.resolution, data.au_names)
            self.train = data
        elif cfg.val_identities > 0 and data.num_identities > cfg.val_identities:
            n = data.num_identities
            self.val = data.subset_identities(list(range(n - cfg.val_identities, n)))
            self.train = data.subset_identities(list(range(n - cfg.val_identities)))
        else:
            self.val, self.train = None, data
        self.au_names = self.train.au_names
        self.attribute_targets = None
        if cfg.identity_attribute_weight > 0:
            self.attribute_targets = self._attribute_targets()
        self.echo(f"training data: {len(self.train)} samples, {self.train.num_identities} identities, "
                  f"{len(self.au_names)} AUs; validation: {0 if self.val is None else len(self.val)} samples")
        self.by_identity: list[list[int]] = [[] for _ in range(self.train.num_identities)]
        for i, ident in enumerate(self.train.identity.tolist()):
            self.by_identity[ident].append(i)

    def _attribute_targets(self) -> torch.Tensor:
        """Each training identity's attributes, standardised per column (so every attribute counts alike)."""
        if self.train.identity_attributes is None:  # every folder has the file (checked first): columns differ
            raise ValueError(f"--identity-attribute-weight: the data folders' {ATTRIBUTES_FILE} have different "
                             f"columns; give folders whose attributes match")
        a = self.train.identity_attributes
        return (a - a.mean(0)) / a.std(0, correction=0).clamp(min=1e-6)

    def _fresh_model(self) -> tuple[MAUGen, bool, bool]:
        """(model, needs VAE training, train text encoder by default)."""
        cfg = self.cfg
        if cfg.init:
            model = realign(MAUGen.from_pretrained(cfg.init))
            if model.au_names != self.au_names:
                raise ValueError(f"--init {cfg.init}: AU list {model.au_names} differs from the data's {self.au_names}")
            if cfg.vae:
                model, restarted = setup.with_vae(model, cfg.vae, cfg.resolution, cfg.seed)
                realign(model.vae)
                self.logger.log({"type": "new_vae", "vae": cfg.vae, "resolution": cfg.resolution,
                                 "restarted": restarted})
            return self._schedule(self._identity_input(model), None, None), False, False
        if cfg.base:
            model = setup.build_from_base(cfg.base, cfg.config, self.au_names, cfg.resolution, cfg.seed)
            model.init_au_cue_from_text()
            return self._schedule(self._identity_input(model), None, None), False, False
        tok_dir = self.out / "tokenizer"
        write_word_tokenizer(tok_dir, vocabulary_texts(self.train))
        model = self._identity_input(setup.build_from_scratch(cfg.config, self.au_names, cfg.resolution, tok_dir, cfg.seed))
        model.init_au_cue_from_text()  # language init (reference §6) through the (still random) text encoder
        needs_vae = True
        if cfg.vae:
            model, needs_vae = setup.with_vae(model, cfg.vae, cfg.resolution, cfg.seed)[0], False
            realign(model.vae)
        return self._schedule(model, "v_prediction", True), needs_vae, True

    def _identity_input(self, model: MAUGen) -> MAUGen:
        """``--identity-input`` written into the model's config (so the saved model samples as it was trained)."""
        if self.cfg.identity_input is None or model.config["identity_encoder"].get("input", "frame") == self.cfg.identity_input:
            return model
        config = copy.deepcopy(model.config)
        config["identity_encoder"]["input"] = self.cfg.identity_input
        configs.validate(config)
        return setup.rebuild(model, config)

    def _schedule(self, model: MAUGen, default_prediction: str | None, default_zero_snr: bool | None) -> MAUGen:
        """The noise schedule the model is trained for (and sampled with: it is part of the checkpoint).

        From scratch the default is v-prediction on zero-terminal-SNR betas with trailing timesteps (Lin et
        al. 2024): with SD's schedule the last training step still holds ~7% of the image, a small model
        learns to read the global colours from it, and at sampling time (pure noise) it then ignores the
        canvas and draws random backgrounds, hair and skin colours.
        """
        prediction = self.cfg.prediction_type or default_prediction
        zero_snr = self.cfg.zero_snr if self.cfg.zero_snr is not None else default_zero_snr
        if prediction is None and zero_snr is None:
            return model
        config = model.config
        sched = dict(config["scheduler"])
        if prediction is not None:
            if prediction not in ("epsilon", "v_prediction"):
                raise ValueError(f"--prediction-type must be epsilon or v_prediction, got {prediction!r}")
            sched["prediction_type"] = prediction
        if zero_snr is not None:
            sched["rescale_betas_zero_snr"] = bool(zero_snr)
            if zero_snr:
                sched["timestep_spacing"] = "trailing"
        if sched.get("rescale_betas_zero_snr") and sched.get("prediction_type") == "epsilon":
            raise ValueError("zero terminal SNR needs --prediction-type v_prediction")
        config["scheduler"] = sched
        return setup.rebuild(model, config)

    # ------------------------------------------------------------------ checkpoints
    def checkpoints(self) -> list[Path]:
        """Checkpoint folders, oldest first (every VAE-phase one before every main-phase one)."""
        found = [(CHECKPOINT_PATTERN.match(p.name), p) for p in (self.out / "checkpoints").iterdir()]
        return [p for m, p in sorted(((m, p) for m, p in found if m), key=lambda mp: (PHASE_ORDER[mp[0].group(1)], int(mp[0].group(2))))]

    def _save_checkpoint(self, step: int, phase: str, extra: dict[str, Any]) -> Path:
        final = self.out / "checkpoints" / f"{ {'vae': 'vae', 'main': 'step', 'decoder': 'dec'}[phase]}-{step:07d}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tensors: dict[str, torch.Tensor] = {}
        opt_t, opt_meta = optimizer_tensors(self.opt)
        tensors.update(opt_t)
        for k, p in self.params.items():
            tensors[f"raw/{k}"] = p.detach().contiguous().cpu()
        if self.mrl is not None:
            for k, v in self.mrl.state_dict().items():
                tensors[f"mrl/{k}"] = v.detach().contiguous().cpu()
        critic_meta = None
        if self.critic is not None:
            for k, v in self.critic.state_dict().items():
                tensors[f"critic/{k}"] = v.detach().contiguous().cpu()
            critic_t, critic_meta = optimizer_tensors(self.critic_opt, "critic_opt")
            tensors.update(critic_t)
        if self.ema is not None:
            with self.ema.applied(self.params):
                self.model.save_pretrained(tmp / "model")
        else:
            self.model.save_pretrained(tmp / "model")
        save_file(tensors, str(tmp / STATE_FILE))
        meta = {"step": step, "phase": phase, "optimizer": opt_meta, "critic_optimizer": critic_meta, "config": self.cfg.to_json(),
                "scaler": self.scaler.state_dict() if self.scaler else None, **extra}
        (tmp / TRAINER_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        shutil.rmtree(final, ignore_errors=True)
        tmp.replace(final)
        for old in self.checkpoints()[:-max(1, self.cfg.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
        self.logger.log({"type": "checkpoint", "phase": phase, "step": step, "path": str(final)})
        return final

    # ------------------------------------------------------------------ param sets
    def _setup_phase(self, phase: str) -> None:
        m = self.model
        m.requires_grad_(False)
        m.train()
        self.critic = None
        if phase == "vae":
            modules = {"vae": m.vae}
        elif phase == "decoder":
            m.eval()
            m.vae.decoder.train()
            modules = {"vae.decoder": m.vae.decoder, "vae.post_quant_conv": m.vae.post_quant_conv}
            if self.cfg.decoder_adversarial_weight > 0:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(_seed(self.cfg.seed, 78))
                    self.critic = PatchDiscriminator().to(self.device).train()
                self.critic_opt = torch.optim.AdamW(self.critic.parameters(), lr=CRITIC_LR, betas=CRITIC_BETAS, weight_decay=0.0)
        else:
            m.vae.eval()
            modules = {"dig": m.dig, "identity_encoder": m.identity_encoder, "mapping": m.mapping}
            if self.train_text:
                modules["text.text_encoder"] = m.text.text_encoder
            else:
                m.text.text_encoder.eval()
        self.params: dict[str, torch.nn.Parameter] = {}
        for prefix, module in modules.items():
            module.requires_grad_(True)
            for name, p in module.named_parameters():
                self.params[f"{prefix}.{name}"] = p
        if phase == "main":
            m.au_cue.requires_grad_(True)
            self.params["au_cue"] = m.au_cue
            if self.train_text:  # the <ID>/<ID2> rows are never read (their slots are overwritten)
                pass
            dim = m.token_dim
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_seed(self.cfg.seed, 77))
                n_attr = 0 if self.attribute_targets is None else self.attribute_targets.shape[1]
                self.mrl = setup.MRLHeads(dim, m.identity_encoder.out_dim, n_attr).to(self.device)
            group = list(self.params.values()) + list(self.mrl.parameters())
            self.opt = torch.optim.AdamW(group, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
            self.ema = EMA(self.params, self.cfg.ema, self.cfg.ema_warmup) if self.cfg.ema > 0 else None
        else:
            self.mrl, self.ema = None, None
            self.opt = torch.optim.AdamW(list(self.params.values()), lr=self.cfg.vae_lr, weight_decay=0.0)

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _backward_step(self, loss: torch.Tensor, params: list[torch.nn.Parameter]) -> float:
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip) if self.cfg.grad_clip > 0 else torch.tensor(0.0)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        return float(norm)

    # ------------------------------------------------------------------ VAE phase
    def _vae_step(self, step: int, decoder_only: bool = False) -> dict[str, float]:
        """One VAE step on training images and references (random flips); ``decoder_only``: the encoder and
        so the latent space stay fixed, only the decoder learns (phase 3, after the UNet was trained)."""
        cfg = self.cfg
        g = torch.Generator().manual_seed(_seed(cfg.seed, 1 if not decoder_only else 21, step))
        torch.manual_seed(_seed(cfg.seed, 2 if not decoder_only else 22, step))
        b = cfg.vae_batch_size or cfg.batch_size
        n, n_ref = len(self.train), self.train.num_identities
        idx = torch.randint(0, n + n_ref, (b,), generator=g)
        imgs = torch.stack([self.train.images[i] if i < n else self.train.ref_images[i - n] for i in idx.tolist()])
        flip = torch.rand(b, generator=g) < 0.5
        imgs = torch.where(flip[:, None, None, None], imgs.flip(-1), imgs)
        x = (to_unit(imgs) * 2 - 1).to(self.device)
        w = None
        if cfg.vae_expression_weight > 0:  # each image's identity reference (a reference is its own)
            refs = torch.stack([self.train.ref_images[int(self.train.identity[i]) if i < n else i - n] for i in idx.tolist()])
            refs = torch.where(flip[:, None, None, None], refs.flip(-1), refs)
            w = expression_weights(x, (to_unit(refs) * 2 - 1).to(self.device), cfg.vae_expression_weight)
        noise_g = torch.Generator(device=self.device).manual_seed(_seed(cfg.seed, 3, step))
        with self._autocast():
            with torch.no_grad() if decoder_only else nullcontext():
                post = self.model.vae.encode(x).latent_dist
                z = post.sample(generator=noise_g)
            rec = self.model.vae.decode(z).sample
        rec = rec.float()
        l1, l2 = weighted_mean((rec - x).abs(), w), weighted_mean((rec - x) ** 2, w)
        kl = post.kl().mean() / z[0].numel()
        loss = l1 + l2 + (0.0 if decoder_only else cfg.kl_weight * kl * z[0].numel())
        adversarial = {}
        if decoder_only and self.critic is not None:  # critic step first, then the decoder's hinge term (fp32: small)
            d_loss = critic_loss(self.critic(x), self.critic(rec.detach()))
            self.critic_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self.critic_opt.step()
            g_loss = generator_loss(self.critic(rec))
            loss = loss + cfg.decoder_adversarial_weight * g_loss
            adversarial = {"adv_critic": d_loss.item(), "adv_decoder": g_loss.item()}
        total = cfg.decoder_steps if decoder_only else self._vae_total
        for group in self.opt.param_groups:
            group["lr"] = lr_at(step, total, cfg.vae_lr, min(cfg.warmup, total // 5 + 1), cfg.min_lr_ratio)
        norm = self._backward_step(loss, list(self.params.values()))
        return {"loss": loss.item(), "vae_l1": l1.item(), "vae_mse": l2.item(), "vae_kl": kl.item(), "grad_norm": norm,
                **adversarial}

    @torch.no_grad()
    def _finish_vae(self) -> None:
        """Set the VAE scaling factor so that scaled latents have unit standard deviation."""
        vae = self.model.vae
        vae.eval()
        n = min(len(self.train), 512)
        sel = torch.linspace(0, len(self.train) - 1, n).long()
        means = []
        for start in range(0, n, 64):
            x = (to_unit(self.train.images[sel[start:start + 64]]) * 2 - 1).to(self.device)
            means.append(vae.encode(x).latent_dist.mean.float().cpu())
        std = float(torch.cat(means).std())
        factor = round(1.0 / max(std, 1e-6), 6)
        vae.register_to_config(scaling_factor=factor)
        config = self.model.config
        config["vae"]["scaling_factor"] = factor
        self.model = setup.rebuild(self.model, config)
        self.logger.log({"type": "vae_done", "latent_std": std, "scaling_factor": factor})

    # ------------------------------------------------------------------ latent caches
    @torch.no_grad()
    def _encode_all(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.model.vae
        means, stds = [], []
        for start in range(0, len(images), 64):
            x = (to_unit(images[start:start + 64]) * 2 - 1).to(self.device)
            post = vae.encode(x.to(self.model.vae.dtype)).latent_dist
            means.append(post.mean.float())
            stds.append(post.std.float())
        return torch.cat(means), torch.cat(stds)

    @torch.no_grad()
    def _build_caches(self) -> None:
        """The frozen VAE's latents of every training image, reference, masked canvas and the black canvas;
        read from ``OUT/latent_cache.safetensors`` when it was written for this VAE, data and device."""
        t0 = time.time()
        d = self.train
        mask = (d.ref_masks.float() / 255.0 > 0.5).float()
        canvas = (d.ref_images.float() * (1.0 - mask)).round().to(torch.uint8)
        black = torch.zeros(1, 3, d.images.shape[-2], d.images.shape[-1], dtype=torch.uint8)
        inputs = {"lat": d.images, "ref": d.ref_images, "canvas": canvas, "paint": black}
        path = self.out / latent_cache.CACHE_FILE
        key = latent_cache.cache_key(self.model.vae, inputs, self.device)
        cached, why = latent_cache.load(path, key)
        if cached is None:
            cached = {}
            for name, images in inputs.items():
                cached[f"{name}_mean"], cached[f"{name}_std"] = self._encode_all(images)
            latent_cache.save(path, key, cached)
        for name in inputs:
            setattr(self, f"{name}_mean", cached[f"{name}_mean"].to(self.device))
            setattr(self, f"{name}_std", cached[f"{name}_std"].to(self.device))
        h = self.lat_mean.shape[-1]
        self.mask_lat = F.interpolate(mask, size=(h, h), mode="nearest").to(self.device)
        self.logger.log({"type": "latent_cache", "loaded": why == "loaded", "reason": why, "file": str(path),
                         "samples": len(d), "references": d.num_identities, "seconds": round(time.time() - t0, 1)})

    # ------------------------------------------------------------------ main phase
    def _main_step(self, step: int) -> dict[str, float]:
        cfg, d, m, dev = self.cfg, self.train, self.model, self.device
        g = torch.Generator().manual_seed(_seed(cfg.seed, 11, step))
        torch.manual_seed(_seed(cfg.seed, 12, step))
        rng = np.random.default_rng(_seed(cfg.seed, 13, step))
        b = cfg.batch_size
        idx = torch.randint(0, len(d), (b,), generator=g)
        ident = d.identity[idx]
        paint = torch.rand(b, generator=g) < cfg.paint_prob
        paint_ref = paint & (torch.rand(b, generator=g) < 0.5)
        drop = torch.rand(b, generator=g) < cfg.cond_drop_prob
        drop_neg = torch.rand(b, generator=g) < 0.5
        swap = torch.rand(b, generator=g) < cfg.id_swap_prob
        swap_pick = torch.rand(b, generator=g)
        timesteps = torch.randint(0, self.noise_sched.config.num_train_timesteps, (b,), generator=g)
        noise_g = torch.Generator().manual_seed(_seed(cfg.seed, 14, step))
        eps_lat = torch.randn((b, *self.lat_mean.shape[1:]), generator=noise_g)
        eps_canvas = torch.randn(eps_lat.shape, generator=noise_g)
        noise = torch.randn(eps_lat.shape, generator=noise_g)

        # prompts
        prompts = []
        for k in range(b):
            i, p = int(idx[k]), None
            if drop[k]:
                p = DEFAULT_NEGATIVE if drop_neg[k] else ""
            elif paint_ref[k]:
                p = augment_demographics(d.ref_prompts[int(ident[k])], rng) if rng.random() < cfg.demographics_prob else d.ref_prompts[int(ident[k])]
            else:
                p = d.prompts[i] if not paint[k] else strip_placeholder(d.prompts[i])
                if rng.random() < cfg.demographics_prob:
                    p = augment_demographics(p, rng)
            prompts.append(p)

        # identity input: the reference, or another image of the same identity
        faces = []
        for k in range(b):
            person = int(ident[k])
            if swap[k]:
                pool = self.by_identity[person]
                faces.append(d.images[pool[int(swap_pick[k] * len(pool)) % len(pool)]])
            else:
                faces.append(d.ref_images[person])
        faces = to_unit(torch.stack(faces)).to(dev)
        id_masks = (d.ref_masks[ident].float() / 255.0).to(dev)  # same framing for every image of a person

        # latents
        sf = m.vae.config.scaling_factor
        tgt_mean = torch.where(paint_ref[:, None, None, None], self.ref_mean[ident], self.lat_mean[idx])
        tgt_std = torch.where(paint_ref[:, None, None, None], self.ref_std[ident], self.lat_std[idx])
        latents = (tgt_mean + tgt_std * eps_lat.to(dev)) * sf
        pm = paint[:, None, None, None].to(dev)
        c_mean = torch.where(pm, self.paint_mean.expand_as(tgt_mean), self.canvas_mean[ident])
        c_std = torch.where(pm, self.paint_std.expand_as(tgt_std), self.canvas_std[ident])
        masked = (c_mean + c_std * eps_canvas.to(dev)) * sf
        mask_lat = torch.where(pm, torch.ones_like(self.mask_lat[ident]), self.mask_lat[ident])
        t_dev = timesteps.to(dev)
        noise = noise.to(dev)
        noisy = self.noise_sched.add_noise(latents, noise, t_dev)
        x = torch.cat([noisy, mask_lat, masked], dim=1)

        intensity = d.intensity[idx].to(dev)
        label_w = (~paint_ref).float().to(dev)  # a reference's own labels are unknown in general

        with self._autocast():
            feats = setup.identity_features(m, faces, id_masks)
            words = m.mapping(feats)                                    # [B,2,D]
            has_id = torch.tensor([ID_PLACEHOLDER.split()[0] in p for p in prompts])
            text, pooled = setup.encode_prompts(m.text, prompts, words if bool(has_id.any()) else None)
            label_ident = torch.where(paint[:, None, None].to(dev), torch.zeros_like(words), words)
            cue = m.au_cue.expand(b, -1, -1)
            eps, levels, tokens = setup.dig_forward(m.dig, x, t_dev, text, cue, label_ident)
        eps = eps.float()
        if self.noise_sched.config.prediction_type == "v_prediction":
            target = self.noise_sched.get_velocity(latents, noise, t_dev)
        else:
            target = noise
        w_lat = None
        if cfg.diffusion_expression_weight > 0:
            tgt_images = torch.where(paint_ref[:, None, None, None], d.ref_images[ident], d.images[idx])
            w_lat = expression_weights(to_unit(tgt_images) * 2 - 1, to_unit(d.ref_images[ident]) * 2 - 1,
                                       cfg.diffusion_expression_weight, size=eps.shape[-1]).to(dev)
        loss_diff = weighted_mean((eps - target) ** 2, w_lat)

        occ_t = (intensity >= cfg.occurrence_threshold).float()
        int_t = intensity / 5.0
        lw = label_w[:, None]

        def label_losses(det, reg):
            occ = multilabel_focal(det, occ_t, gamma=cfg.occ_gamma, weight=lw)
            inten = focal_mse(reg, int_t, gamma=cfg.int_gamma, weight=lw)
            return occ, inten

        occ_final, int_final = label_losses(*levels[-1])
        loss_occ, loss_int = occ_final, int_final
        aux_occ = aux_int = torch.zeros((), device=dev)
        if cfg.aux_weight > 0 and len(levels) > 1:
            for det, reg in levels[:-1]:
                o, i_ = label_losses(det, reg)
                aux_occ, aux_int = aux_occ + o, aux_int + i_
            aux_occ, aux_int = aux_occ / (len(levels) - 1), aux_int / (len(levels) - 1)

        # MRL: text <-> AU tokens (same expression), identity words <-> identity features of the target image
        mrl = torch.zeros((), device=dev)
        rows = (~drop & ~paint_ref).nonzero().flatten().tolist()
        if len(rows) >= 2 and cfg.w_mrl > 0:
            r = torch.tensor(rows, device=dev)
            z_text = self.mrl.text(pooled.float()[r])
            z_au = self.mrl.au(tokens.float()[r].mean(1))
            key = torch.round(intensity[r])
            same_expr = (key[:, None, :] == key[None, :, :]).all(-1)
            mrl = mrl + info_nce(z_text, z_au, same_expr, cfg.mrl_temperature)
        id_rows = (~paint).nonzero().flatten().tolist()
        if len(id_rows) >= 2 and cfg.w_mrl > 0:
            r = torch.tensor(id_rows, device=dev)
            tgt_faces = to_unit(d.images[idx[r.cpu()]]).to(dev)
            jitter_g = torch.Generator().manual_seed(_seed(cfg.seed, 15, step))
            with self._autocast():
                z_img = self.mrl.image(setup.identity_features(
                    m, colour_jitter(tgt_faces, cfg.mrl_colour_jitter, jitter_g), id_masks[r]).float())
                id_words = words[r] if cfg.mrl_colour_jitter <= 0 else m.mapping(setup.identity_features(
                    m, colour_jitter(faces[r], cfg.mrl_colour_jitter, jitter_g), id_masks[r]))
            z_id = self.mrl.identity(id_words.float().flatten(1))
            same_id = ident[r.cpu()][:, None] == ident[r.cpu()][None, :]
            mrl = mrl + info_nce(z_id, z_img, same_id.to(dev), cfg.mrl_temperature)

        # identity attributes: the words of every row must predict its person's shape (reference or not)
        attr = torch.zeros((), device=dev)
        if self.attribute_targets is not None:
            attr = F.mse_loss(self.mrl.attributes(words.float().flatten(1)), self.attribute_targets[ident].to(dev))

        # identity in the image: the clean image the UNet predicts, decoded, must show the person's attributes as
        # the (fixed) identity side reads them; rows that name the identity (inpainting, not dropped) only
        attr_img = torch.zeros((), device=dev)
        img_rows = (~paint & ~drop).nonzero().flatten()
        if cfg.identity_image_weight > 0 and len(img_rows):
            r = img_rows.to(dev)
            a = self.noise_sched.alphas_cumprod.to(dev)[t_dev[r]].view(-1, 1, 1, 1)
            if self.noise_sched.config.prediction_type == "v_prediction":
                x0 = a.sqrt() * noisy[r] - (1 - a).sqrt() * eps[r]
            else:
                x0 = (noisy[r] - (1 - a).sqrt() * eps[r]) / a.sqrt().clamp(min=0.05)
            with self._autocast():
                faces_x0 = (m.vae.decode(x0 / sf).sample.float() + 1) / 2
                read = setup.judged_attributes(m, self.mrl.attributes, faces_x0, id_masks[r])
            attr_img = F.mse_loss(read.float(), self.attribute_targets[ident[img_rows]].to(dev))

        loss = (loss_diff + cfg.w_occ * (loss_occ + cfg.aux_weight * aux_occ)
                + cfg.w_int * (loss_int + cfg.aux_weight * aux_int) + cfg.w_mrl * mrl
                + cfg.identity_attribute_weight * attr + cfg.identity_image_weight * attr_img)
        for group in self.opt.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio, self._time_progress())
        norm = self._backward_step(loss, list(self.params.values()) + list(self.mrl.parameters()))
        if self.ema is not None:
            self.ema.update(self.params, step)
        with torch.no_grad():
            mae = float(((levels[-1][1].float() * 5 - intensity).abs() * lw).sum() / (lw.sum() * len(self.au_names)).clamp(min=1))
        vals = {"loss": loss, "diffusion": loss_diff, "occurrence": loss_occ, "intensity": loss_int,
                "aux_occurrence": aux_occ, "aux_intensity": aux_int, "mrl": mrl}
        if self.attribute_targets is not None:
            vals["identity_attributes"] = attr
        if cfg.identity_image_weight > 0:
            vals["identity_image"] = attr_img
        return {**{k: v.detach().item() for k, v in vals.items()}, "label_mae": mae, "grad_norm": norm,
                "lr": self.opt.param_groups[0]["lr"]}

    def _time_progress(self) -> float:
        """Fraction of --max-time spent in the main phase (0 without --max-time: the run stays deterministic)."""
        if self.cfg.max_time_s is None:
            return 0.0
        budget = self.cfg.max_time_s - (self._main_started - self.start_time)
        return (time.time() - self._main_started) / max(1.0, budget)

    # ------------------------------------------------------------------ validation
    def _val_batch(self):
        v = self.val if self.val is not None else self.train
        n = min(self.cfg.val_samples, len(v))
        # spread over identities and expressions, deterministically
        order = sorted(range(len(v)), key=lambda i: (int(v.identity[i]) * 7919 + i * 104729) % 1000003)
        picks, seen = [], set()
        for i in order:
            if int(v.identity[i]) not in seen or len(seen) >= v.num_identities:
                picks.append(i)
                seen.add(int(v.identity[i]))
            if len(picks) >= n:
                break
        return v, picks

    @torch.no_grad()
    def validate(self, step: int) -> dict[str, Any]:
        from PIL import Image

        cfg, m = self.cfg, self.model
        v, picks = self._val_batch()
        ctx = self.ema.applied(self.params) if self.ema is not None else nullcontext()
        t0 = time.time()
        with ctx:
            m.eval()
            refs = to_unit(v.ref_images[v.identity[picks]])
            masks = (v.ref_masks[v.identity[picks]].float() / 255.0 > 0.5).float()
            canvases = refs * (1 - masks)
            ids = m.encode_identity(refs.to(self.device), masks.to(self.device))
            gens = [torch.Generator(device=self.device).manual_seed(_seed(cfg.seed, 99, k)) for k in range(len(picks))]
            out = m.sample([v.prompts[i] for i in picks], canvases.to(self.device), masks.to(self.device), ids, gens,
                           num_inference_steps=cfg.val_steps, guidance_scale=cfg.guidance_scale,
                           negative_prompt=DEFAULT_NEGATIVE)
            # whole-frame painting from the identity prompt (how `mifa build` draws references)
            n_paint = min(4, len(picks))
            paint_prompts = [v.ref_prompts[int(v.identity[i])] for i in picks[:n_paint]]
            size = refs.shape[-1]
            paint = m.sample(paint_prompts, torch.zeros(n_paint, 3, size, size, device=self.device),
                             torch.ones(n_paint, 1, size, size, device=self.device), None, gens[:n_paint],
                             num_inference_steps=cfg.val_steps, guidance_scale=cfg.guidance_scale,
                             negative_prompt=DEFAULT_NEGATIVE)
        m.train()
        if self.phase == "main":
            m.vae.eval()
            if not self.train_text:
                m.text.text_encoder.eval()
        requested = v.intensity[picks]
        err = (out.intensity - requested).abs()
        occ_true = requested >= 2
        occ_pred = out.occurrence_prob >= 0.5
        tp = float((occ_true & occ_pred).sum())
        f1 = 2 * tp / max(1.0, float(occ_true.sum() + occ_pred.sum()))
        # grid: reference | teacher target | generated (rows), plus painted references
        tiles = [refs, to_unit(v.images[picks]), out.images]
        row_imgs = [torch.cat(list(t), dim=-1) for t in tiles]
        paint_row = torch.cat(list(paint.images) + [torch.zeros_like(refs[0])] * (len(picks) - n_paint), dim=-1)
        grid = torch.cat(row_imgs + [paint_row], dim=-2)
        folder = self.out / "validation"
        folder.mkdir(exist_ok=True)
        path = folder / f"step-{step:07d}.png"
        Image.fromarray((grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()).save(path)
        record = {"type": "validation", "step": step, "intensity_mae": float(err.mean()), "occurrence_f1": f1,
                  "per_au_mae": {au: round(float(err[:, j].mean()), 4) for j, au in enumerate(self.au_names)},
                  "image_std": float(out.images.std()), "seconds": round(time.time() - t0, 2), "grid": str(path)}
        self.logger.log(record)
        return record

    # ------------------------------------------------------------------ run
    def _resume_point(self) -> Path | None:
        if not self.cfg.resume:
            return None
        ckpts = self.checkpoints()
        return ckpts[-1] if ckpts else None

    def run(self) -> Path:
        cfg = self.cfg
        self._load()
        ckpt = self._resume_point()
        meta: dict[str, Any] = {}
        if ckpt is not None:
            meta = json.loads((ckpt / TRAINER_FILE).read_text())
            self.model = realign(MAUGen.from_pretrained(ckpt / "model"))
            if self.model.au_names != self.au_names:
                raise ValueError(f"{ckpt}: AU list differs from the data's")
            self.needs_vae = meta["needs_vae"]
            self.train_text = meta["train_text"]
            self.echo(f"resuming from {ckpt} (phase {meta['phase']}, step {meta['step']})")
        else:
            if any(self.checkpoints()) and not cfg.resume:
                raise FileExistsError(f"{self.out} already holds checkpoints; pass --resume to continue, or use another --out")
            self.model, self.needs_vae, default_text = self._fresh_model()
            self.train_text = default_text if cfg.train_text_encoder is None else cfg.train_text_encoder
        if self.model.resolution != cfg.resolution:
            raise ValueError(f"--resolution is {cfg.resolution} but the model draws {self.model.resolution} px images; "
                             f"pass --resolution {self.model.resolution}, or --vae with a VAE for the new size")
        self.model.to(self.device)
        vae_steps = cfg.vae_steps if cfg.vae_steps is not None else (max(100, cfg.steps // 8) if self.needs_vae else 0)
        self._vae_total = vae_steps
        common = {"needs_vae": self.needs_vae, "train_text": self.train_text, "vae_steps": vae_steps}
        self.logger.log({"type": "start", "resume_from": None if ckpt is None else str(ckpt), "config": cfg.to_json(),
                         "device": str(self.device), "threads": torch.get_num_threads(),
                         "parameters": self.model.parameter_counts(), **common})

        # ---- phase 1: VAE
        start_vae = 0
        if ckpt is not None and meta["phase"] == "vae":
            start_vae = meta["step"]
        done_vae = ckpt is not None and meta["phase"] in ("main", "decoder")
        if vae_steps > 0 and not done_vae:
            self.phase = "vae"
            self._setup_phase("vae")
            if ckpt is not None:
                self._load_state(ckpt, meta)
            acc: dict[str, float] = {}
            count, last = 0, time.time()
            for step in range(start_vae, vae_steps):
                rec = self._vae_step(step)
                acc = {k: acc.get(k, 0.0) + v for k, v in rec.items()}
                count += 1
                if (step + 1) % cfg.log_every == 0 or step + 1 == vae_steps:
                    self.logger.log({"type": "train", "phase": "vae", "step": step + 1,
                                     **{k: v / count for k, v in acc.items()}, "sec_per_step": (time.time() - last) / count})
                    acc, count, last = {}, 0, time.time()
                if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < vae_steps:
                    self._save_checkpoint(step + 1, "vae", common)
            self._finish_vae()
            self._setup_phase("main")
            self.phase = "main"
            self._save_checkpoint(0, "main", common)
            start = 0
        else:
            self.phase = "main"
            self._setup_phase("main")
            start = 0
            if ckpt is not None and meta["phase"] == "main":
                self._load_state(ckpt, meta)
                start = meta["step"]
            elif ckpt is not None and meta["phase"] == "decoder":
                start = cfg.steps

        # ---- phase 2: MAUGen
        from diffusers import DDPMScheduler

        sched_cfg = {k: v for k, v in self.model.scheduler_config.items() if not k.startswith("_")}
        self.noise_sched = DDPMScheduler.from_config(sched_cfg)
        if start < cfg.steps:
            self._build_caches()
        self._main_started = time.time()
        acc, count, last = {}, 0, time.time()
        step = start
        stopped_early = False
        for step in range(start, cfg.steps):
            rec = self._main_step(step)
            acc = {k: acc.get(k, 0.0) + v for k, v in rec.items()}
            count += 1
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                self.logger.log({"type": "train", "phase": "main", "step": done, **{k: v / count for k, v in acc.items()},
                                 "sec_per_step": (time.time() - last) / count, "elapsed_s": round(time.time() - self.start_time, 1)})
                acc, count, last = {}, 0, time.time()
            if cfg.validate_every and done % cfg.validate_every == 0 and done < cfg.steps:
                self.validate(done)
            if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                self._save_checkpoint(done, "main", common)
            if cfg.max_time_s is not None and time.time() - self.start_time > cfg.max_time_s and done < cfg.steps:
                self._save_checkpoint(done, "main", common)
                self.logger.log({"type": "stopped", "step": done, "reason": f"--max-time {cfg.max_time_s}s reached"})
                stopped_early = True
                break
        final_step = cfg.steps if not stopped_early else step + 1
        if not stopped_early and not (ckpt is not None and meta["phase"] == "decoder"):
            self._save_checkpoint(final_step, "main", common)

        # ---- phase 3: VAE decoder only (sharper images from the same latents)
        if cfg.decoder_steps > 0 and not stopped_early:
            if self.ema is not None:  # the decoder phase trains on top of the EMA weights of phase 2
                with torch.no_grad():
                    for k, p in self.params.items():
                        p.copy_(self.ema.shadow[k])
            self.phase = "decoder"
            self._setup_phase("decoder")
            start_dec = 0
            if ckpt is not None and meta["phase"] == "decoder":
                self._load_state(ckpt, meta)
                start_dec = meta["step"]
            acc, count, last = {}, 0, time.time()
            for dstep in range(start_dec, cfg.decoder_steps):
                rec = self._vae_step(dstep, decoder_only=True)
                acc = {k: acc.get(k, 0.0) + v for k, v in rec.items()}
                count += 1
                if (dstep + 1) % cfg.log_every == 0 or dstep + 1 == cfg.decoder_steps:
                    self.logger.log({"type": "train", "phase": "decoder", "step": dstep + 1,
                                     **{k: v / count for k, v in acc.items() if k != "vae_kl"},
                                     "sec_per_step": (time.time() - last) / count})
                    acc, count, last = {}, 0, time.time()
                if (dstep + 1) % cfg.checkpoint_every == 0 or dstep + 1 == cfg.decoder_steps:
                    self._save_checkpoint(dstep + 1, "decoder", common)
            self.model.eval()
        self.validate(final_step)
        final = self.out / "model"
        tmp = self.out / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if self.ema is not None:
            with self.ema.applied(self.params):
                self.model.save_pretrained(tmp)
        else:
            self.model.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.replace(final)
        self.logger.log({"type": "done", "step": final_step, "model": str(final),
                         "wall_s": round(time.time() - self.start_time, 1)})
        return final

    def _load_state(self, ckpt: Path, meta: dict[str, Any]) -> None:
        tensors = {k: v.clone() for k, v in load_file(str(ckpt / STATE_FILE)).items()}
        if self.ema is not None:  # the model folder holds the EMA weights: they are the shadow
            self.ema.shadow = {k: p.detach().clone() for k, p in self.params.items()}
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(tensors[f"raw/{k}"])
        if self.mrl is not None:
            self.mrl.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("mrl/")})
        load_optimizer(self.opt, {k: v.to(self.device) for k, v in tensors.items()}, meta["optimizer"])
        if self.critic is not None and meta.get("critic_optimizer"):  # else: the critic starts now, fresh
            self.critic.load_state_dict({k.removeprefix("critic/"): v for k, v in tensors.items() if k.startswith("critic/")})
            load_optimizer(self.critic_opt, {k: v.to(self.device) for k, v in tensors.items()}, meta["critic_optimizer"],
                           "critic_opt")
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])


def train(cfg: TrainConfig, echo: Callable[[str], None] | None = print) -> Path:
    """Run (or resume) a training; returns the final model folder."""
    random.seed(cfg.seed)
    return Trainer(cfg, echo).run()
