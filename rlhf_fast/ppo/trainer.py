"""The PPO loop, top to bottom: set-up, supervised warm-up, then per step rollout -> scoring -> advantages ->
epochs x minibatches of clipped policy and value updates; metrics, checkpoints and a held-out evaluation.

Every log-prob, KL, advantage and loss goes through the op namespace of rlhf_fast.ppo.ops (fused kernels, or
the torch references with --kernels off), so the two modes run the identical loop.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import kl_full, models, optim, plots, precision, sharding, tasks
from .config import PPOConfig
from .ops import get_ops
from .policy_loss import minibatch_policy_loss

IGNORE = -100
TIMED_PHASES = ("generate", "score", "advantages", "update")


# ---------------------------------------------------------------- set-up


class SetupError(Exception):
    """A bad flag, path or file, found before any work starts."""


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    # where collectives run: the process's GPU under NCCL (it reduces CUDA tensors only), else the CPU
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Averages scalar metrics over processes."""
        if self.world == 1 or not values:
            return values
        keys = sorted(values)
        t = self.sum(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
        return {k: v / self.world for k, v in zip(keys, t.tolist())}

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over processes (on t's device)."""
        return self._reduce(t, dist.ReduceOp.SUM)

    def max(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise max of `t` over processes (on t's device)."""
        return self._reduce(t, dist.ReduceOp.MAX)

    def gather(self, value: float) -> list[float]:
        """Each process's `value`, in rank order."""
        slots = torch.zeros(self.world, dtype=torch.float64)
        slots[self.rank] = value
        return self.sum(slots).tolist()

    def _reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        if self.world == 1:
            return t
        out = t.to(self.device, copy=True)
        dist.all_reduce(out, op=op)
        return out.to(t.device)


def setup_distributed(cfg: PPOConfig) -> tuple[Dist, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: one process per device (NCCL) or per CPU share (gloo)."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SetupError("--device cuda but no CUDA device is visible")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    d = Dist(int(os.environ.get("RANK", "0")), world, local_rank, device)
    if not dist.is_initialized():
        if world > 1:
            dist.init_process_group("nccl" if use_cuda else "gloo")
        elif cfg.fsdp:
            sharding.init_single_process("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(cfg.threads or default_threads(cfg))
    return d, device


def default_threads(cfg: PPOConfig) -> int:
    """One thread for the embedded tiny model: its matrices are too small to split, and on a busy machine extra
    OpenMP threads spin against other processes (measured here: 2 threads ran a step 20x slower than 1 with a
    loaded CPU). Otherwise the cores available divided among this machine's processes."""
    if cfg.model is None:
        return 1
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return max(1, len(os.sched_getaffinity(0)) // local_world)


def build_task(cfg: PPOConfig):
    """The prompt source and the reward, checked before any work starts (bad paths and files raise SetupError)."""
    try:
        return _build_task(cfg)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise SetupError(str(exc)) from exc


def _build_task(cfg: PPOConfig):
    if cfg.model is not None:
        models.check_model_dir("--model", cfg.model)
    if cfg.reward_model is not None:
        models.check_model_dir("--reward-model", cfg.reward_model)
    reward_fn = models.load_reward_function(cfg.reward) if cfg.reward else None
    task: tasks.PromptFile | tasks.SortDigits
    if cfg.prompts is not None:
        task = tasks.PromptFile(cfg.prompts, cfg.eval_size, cfg.seed)
        if reward_fn is None and cfg.reward_model is None:
            raise ValueError("--prompts needs a reward: --reward module:function or --reward-model PATH")
    else:
        task = tasks.SortDigits(cfg.task_length, cfg.eval_size, cfg.seed)
    if cfg.model is not None and cfg.prompts is None:
        raise ValueError("--model needs --prompts (the embedded task uses the embedded tokenizer)")
    if cfg.ptx_coef > 0 and not task.has_demonstrations:
        raise ValueError('--ptx-coef > 0 needs demonstrations ("response" fields in --prompts)')
    if cfg.critic_init == "reward-model" and cfg.reward_model is None:
        raise ValueError("--critic-init reward-model needs --reward-model PATH")
    return task, reward_fn


def critic_from_reward_model(cfg: PPOConfig, reward_model, tokenizer):
    """PPO-max's critic (a copy of the reward model) when --critic-init allows it, else None (the policy's
    trunk is used). The critic reads the policy's token ids, so the two tokenizers must share a vocabulary."""
    if cfg.algo != "ppo" or cfg.critic_init == "policy":
        return None
    if tokenizer.get_vocab() != reward_model.tokenizer.get_vocab():
        if cfg.critic_init == "reward-model":
            raise SetupError(
                "--critic-init reward-model: the reward model's tokenizer differs from the policy's, "
                "so it cannot read the policy's tokens; use --critic-init policy"
            )
        print("critic: starts from the policy's trunk (the reward model's tokenizer differs from the policy's)")
        return None
    return models.ValueModel.from_reward_model(reward_model.model)


# ---------------------------------------------------------------- batching


def encode_prompts(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask (B, P)."""
    encoded = [tokenizer.encode(p) for p in prompts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(encoded), width, dtype=torch.bool)
    for row, e in enumerate(encoded):
        ids[row, width - len(e) :] = torch.tensor(e)
        mask[row, width - len(e) :] = True
    return ids.to(device), mask.to(device)


def encode_responses(tokenizer, responses: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded response ids, each ended by the eos token, and mask (B, R)."""
    encoded = [tokenizer.encode(r) + [tokenizer.eos_token_id] for r in responses]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(encoded), width, dtype=torch.bool)
    for row, e in enumerate(encoded):
        ids[row, : len(e)] = torch.tensor(e)
        mask[row, : len(e)] = True
    return ids.to(device), mask.to(device)


def join(prompt_ids, prompt_mask, response, response_mask):
    """(input_ids, attention_mask (B, P + R), labels (B, R) with IGNORE at padding)."""
    labels = torch.where(response_mask, response, torch.full_like(response, IGNORE))
    return torch.cat([prompt_ids, response], 1), torch.cat([prompt_mask, response_mask], 1), labels


def decode(tokenizer, response, response_mask) -> list[str]:
    rows = []
    for ids, valid in zip(response.tolist(), response_mask.tolist()):
        rows.append(tokenizer.decode([i for i, v in zip(ids, valid) if v and i != tokenizer.eos_token_id]))
    return rows


# ---------------------------------------------------------------- running statistics


class RunningMoments:
    """Running mean and std of all values seen (over every process), for reward normalisation."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0.0, 0.0, 0.0

    def update(self, x: torch.Tensor, d: Dist) -> None:
        stats = d.sum(torch.tensor([x.numel(), x.double().sum().item()], dtype=torch.float64))
        n, total = stats.tolist()
        batch_mean = total / n
        m2 = d.sum(torch.tensor([((x.double() - batch_mean) ** 2).sum().item()], dtype=torch.float64)).item()
        delta, new_count = batch_mean - self.mean, self.count + n
        self.mean += delta * n / new_count
        self.m2 += m2 + delta * delta * self.count * n / new_count
        self.count = new_count

    @property
    def std(self) -> float:
        """Unbiased std, floored so that identical scores normalise to 0 rather than NaN."""
        return max(math.sqrt(self.m2 / max(self.count - 1, 1)), 1e-6) if self.count > 1 else 1.0

    def state_dict(self):
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state):
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]


def whiten(advantages: torch.Tensor, mask: torch.Tensor, d: Dist, ops) -> torch.Tensor:
    """Advantage whitening with the masked mean and unbiased variance of the whole batch (every process's
    tokens under torchrun, so the result does not depend on how the batch is split); 0 at masked tokens."""
    if d.world == 1:
        return ops.masked_whiten(advantages, mask) * mask
    valid = mask.double()
    values = advantages.double() * valid
    count, total, squares = d.sum(torch.stack([valid.sum(), values.sum(), (values * values).sum()])).unbind()
    mean = total / count
    var = (squares - count * mean * mean) / (count - 1)
    return (advantages - mean.float()) * torch.rsqrt(var.float() + 1e-8) * mask


def adaptive_kl_coef(coef: float, kl: float, cfg: PPOConfig, n_samples: int) -> float:
    """Ziegler et al.'s proportional controller: moves beta by at most +-20% x n / horizon per step."""
    error = max(-0.2, min(0.2, kl / cfg.kl_target - 1.0))
    return coef * (1.0 + error * n_samples / cfg.kl_horizon)


def fdpg_pseudo_reward(kind: str, scores, seq_logp, seq_ref_logp, beta: float, log_z: float) -> torch.Tensor:
    """f-DPG per-sequence pseudo-reward beta * -f'(t), t = pi(y) / p(y), p = ref(y) exp(r / beta) / Z.

    f' per divergence: rkl log t + 1, fkl -1/t, js log(2t / (1 + t)), tv sign(t - 1) / 2. For rkl this is
    r - beta (log pi - log ref) - beta (log Z + 1): the KL-penalised reward up to a constant.
    """
    log_t = seq_logp - seq_ref_logp - scores / beta + log_z
    if kind == "rkl":
        f_prime = log_t + 1
    elif kind == "fkl":
        f_prime = -torch.exp(-log_t.clamp(-20, 20))
    elif kind == "js":
        f_prime = math.log(2) + log_t - torch.nn.functional.softplus(log_t)
    elif kind == "tv":
        f_prime = torch.sign(log_t) / 2
    else:
        raise ValueError(f"divergence must be rkl, fkl, js or tv, got {kind!r}")
    return -beta * f_prime


class RunningLogZ:
    """Importance-sampling estimate of log Z = log E_ref[exp(r / beta)] from every sample so far (all
    processes): the mean of exp(r / beta + log ref(y) - log pi(y)) over samples y ~ pi, kept in log space."""

    def __init__(self):
        self.value, self.count = 0.0, 0

    def update(self, log_weights: torch.Tensor, d: Dist) -> float:
        peak = d.max(log_weights.max().double())
        stats = d.sum(
            torch.stack(
                [
                    (log_weights.double() - peak).exp().sum(),
                    torch.tensor(float(log_weights.numel()), dtype=torch.float64),
                ]
            )
        )
        log_total = (peak + stats[0].log()).item()  # log of the sum of this batch's weights
        n = int(stats[1].item())
        if self.count:
            log_total = float(torch.logaddexp(torch.tensor(log_total), torch.tensor(self.value + math.log(self.count))))
        self.count += n
        self.value = log_total - math.log(self.count)
        return self.value

    def state_dict(self):
        return {"value": self.value, "count": self.count}

    def load_state_dict(self, state):
        self.value, self.count = state["value"], state["count"]


# ---------------------------------------------------------------- phases


def supervised_warmup(train_policy, task, tokenizer, cfg, device, generator, d: Dist) -> float:
    """Next-token training on the task's demonstrations (none: skipped); returns the last loss. train_policy: the
    policy's LogProbModel as the update trains it (DDP-wrapped or sharded under torchrun, so every process
    ends with the same weights); each process takes its share of the warmup_batch demonstrations."""
    if not task.has_demonstrations:
        return float("nan")
    optimizer = optim.adamw(train_policy.parameters(), lr=cfg.warmup_lr)
    loss = torch.tensor(float("nan"))
    for _ in range(cfg.warmup_steps):
        loss = demonstration_loss(train_policy, task, tokenizer, max(1, cfg.warmup_batch // d.world), device, generator)
        loss.backward()
        optim.clip_and_step(optimizer, train_policy.parameters(), cfg.max_grad_norm)
    return loss.item()


def demonstration_loss(policy_lp, task, tokenizer, n, device, generator) -> torch.Tensor:
    """Mean negative log-likelihood of demonstrations (the warm-up and PPO-ptx loss)."""
    prompts = task.train_prompts(n, generator)
    pairs = [(p, task.demonstration(p)) for p in prompts]
    pairs = [(p, r) for p, r in pairs if r is not None]
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [p for p, _ in pairs], device)
    response, response_mask = encode_responses(tokenizer, [r for _, r in pairs], device)
    input_ids, attention, labels = join(prompt_ids, prompt_mask, response, response_mask)
    logp = policy_lp(input_ids, attention, labels, prompt_ids.shape[1])
    return -(logp.sum() / response_mask.sum())


@torch.no_grad()
def evaluate(policy, task, tokenizer, score, cfg, device, d: Dist) -> tuple[float, list]:
    """Mean reward of greedy decoding on the held-out prompts (each process takes its share). policy: the
    policy's LogProbModel."""
    prompts = task.eval_prompts()[d.rank :: d.world]
    policy.eval()
    with sharding.gathered(policy), sharding.gathered(getattr(score, "model", None)):
        total, examples = _evaluate_prompts(policy, prompts, tokenizer, score, cfg, device)
    policy.train()
    summed = d.sum(torch.tensor([total, float(len(prompts))], dtype=torch.float64))
    return (summed[0] / summed[1]).item(), examples[:4]


def _evaluate_prompts(policy, prompts, tokenizer, score, cfg, device) -> tuple[float, list]:
    """(sum of the rewards of greedy responses to `prompts`, the first examples)."""
    total, examples = 0.0, []
    for start in range(0, len(prompts), 256):
        chunk = prompts[start : start + 256]
        prompt_ids, prompt_mask = encode_prompts(tokenizer, chunk, device)
        response, response_mask = models.generate(
            policy,
            prompt_ids,
            prompt_mask,
            max_new_tokens=cfg.max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            autocast=precision.compute_dtype(cfg),
        )
        texts = decode(tokenizer, response, response_mask)
        rewards = score(chunk, texts)
        total += float(rewards.sum())
        examples += [{"prompt": p, "response": r, "reward": float(s)} for p, r, s in zip(chunk, texts, rewards)][:4]
    return total, examples


# ---------------------------------------------------------------- checkpoints and outputs


def save_checkpoint(folder: Path, state: dict, rng: dict, d: Dist) -> None:
    """Model, optimiser and running state from the main process (with --fsdp the name of the folder of shards
    every process has written instead of the models and optimisers); each process's RNG states."""
    folder.mkdir(parents=True, exist_ok=True)
    if d.main:
        torch.save(state, folder / "state.tmp")
        os.replace(folder / "state.tmp", folder / "state.pt")
        if "sharded" in state:
            sharding.remove_old_sharded(folder, keep=state["sharded"])
    torch.save(rng, folder / f"rng_rank{d.rank}.tmp")
    os.replace(folder / f"rng_rank{d.rank}.tmp", folder / f"rng_rank{d.rank}.pt")


# ---------------------------------------------------------------- the loop


def train(cfg: PPOConfig) -> dict:
    """Runs (or resumes) a training run: the whole of ``rlhf-fast train``, from Python.

    Parameters
    ----------
    cfg : PPOConfig
        The run's settings. With ``cfg.resume`` set, the run continues from ``<cfg.out>/checkpoint``
        (``rlhf-fast train --resume DIR`` also sets ``out`` to DIR and starts from DIR's saved
        ``config.json``).

    Returns
    -------
    dict
        The summary written to ``<out>/summary.json``: ``eval_reward_before``, ``eval_reward_after``,
        ``eval_reward_gain``, ``wall_time_s``, ``warmup_time_s``, ``warmup_loss``, ``steps``,
        ``resumed_at_step``, ``world_size``, ``fsdp``, ``param_mb_per_rank``, ``optimizer_mb_per_rank``,
        ``peak_rss_mb_per_rank``, ``phase_time_mean_s``, ``examples_before``, ``examples_after`` and
        ``config``.

    Raises
    ------
    rlhf_fast.ppo.trainer.SetupError
        A bad flag, path or file, found before any work starts (the command line prints it and exits).
    """
    run = training_steps(cfg)
    while True:
        try:
            next(run)
        except StopIteration as finished:
            return finished.value


def training_steps(cfg: PPOConfig):
    """The whole run as a generator: yields each PPO step's metrics row, returns the summary (so a benchmark
    can time single steps of a real run)."""
    wall_start = time.perf_counter()
    try:
        cfg.validate()
    except ValueError as exc:
        raise SetupError(str(exc)) from exc
    d, device = setup_distributed(cfg)
    task, reward_fn = build_task(cfg)
    tokenizer = tasks.load_tokenizer(cfg.model)
    if cfg.batch_size % d.world:
        raise SetupError(f"--batch-size {cfg.batch_size} must divide over {d.world} processes")
    out = Path(cfg.out)
    checkpoint_dir = out / "checkpoint"
    resumed = cfg.resume is not None
    if resumed and not (checkpoint_dir / "state.pt").is_file():
        raise SetupError(f"--resume {cfg.resume}: no checkpoint/state.pt there")
    ops = get_ops(cfg.kernels == "on")

    torch.manual_seed(cfg.seed)
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed * 1000 + d.rank)
    sample_gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + d.rank + 1)
    policy = precision.trainable(models.load_policy(cfg, tokenizer.vocab_size).to(device), cfg)
    policy_lp = models.LogProbModel(
        policy,
        ops,
        fused=cfg.kernels == "on" and cfg.fused_head,
        temperature=cfg.temperature,
        autocast=precision.compute_dtype(cfg),
    )
    rm_critic = None
    score: models.RewardFunction | models.RewardModel
    if reward_fn is not None:
        score = models.RewardFunction(reward_fn)
    elif cfg.reward_model is not None:
        score = models.RewardModel(cfg.reward_model, device)
        rm_critic = critic_from_reward_model(cfg, score, tokenizer)  # before the reward model is quantized
    else:
        score = models.RewardFunction(task.reward)
    try:  # the reference is quantized after the warm-up: find out now whether it can be
        models.check_quantizable(policy, cfg.ref_quant, cfg.quant_group_size, "--ref-quant")
        if isinstance(score, models.RewardModel):
            models.check_quantizable(score.model, cfg.reward_quant, cfg.quant_group_size, "--reward-quant")
            models.quantize(precision.frozen(score.model, cfg), cfg.reward_quant, cfg.quant_group_size)
    except ValueError as exc:
        raise SetupError(str(exc)) from exc

    state = torch.load(checkpoint_dir / "state.pt", map_location=device, weights_only=False) if resumed else None
    if state is not None and cfg.fsdp != ("sharded" in state):
        written = "with" if "sharded" in state else "without"
        raise SetupError(f"--resume {cfg.resume}: its checkpoint was written {written} --fsdp; resume it the same way")
    # The reference and the critic start as copies of the policy, built before the models are sharded; they take
    # the policy's weights after its warm-up (sharded models copy their local shards).
    reference = models.frozen_copy(policy, precision.DTYPES[cfg.dtype])
    ref_lp = models.LogProbModel(reference, ops, fused=policy_lp.fused, temperature=cfg.temperature)
    critic = (
        precision.critic(rm_critic or models.ValueModel.from_policy(policy), cfg, device) if cfg.algo == "ppo" else None
    )
    ddp_devices = [device.index] if device.type == "cuda" else None  # DDP replicas (torchrun without --fsdp)
    train_policy: nn.Module = policy_lp
    train_critic: nn.Module | None = critic
    if cfg.fsdp:
        if critic is not None and cfg.critic_embedding == "frozen":  # its own frozen table: a sharded model
            critic.freeze_embedding()  # cannot read another one's
        dtype = precision.compute_dtype(cfg)
        sharding.shard(policy_lp, trainable=True, param_dtype=dtype, forward_methods=("decode",))
        sharding.shard(ref_lp, trainable=False)
        if critic is not None:
            sharding.shard(critic, trainable=True, param_dtype=dtype)
        if isinstance(score, models.RewardModel):
            sharding.shard(score.model, trainable=False)
    elif d.world > 1:
        train_policy = DistributedDataParallel(policy_lp, device_ids=ddp_devices)

    if state is None:
        warmup_start = time.perf_counter()
        warmup_loss = supervised_warmup(train_policy, task, tokenizer, cfg, device, generator, d)
        warmup_time = time.perf_counter() - warmup_start
        eval_before, examples_before = evaluate(policy_lp, task, tokenizer, score, cfg, device, d)
        sharding.copy_weights(reference, policy)
        if critic is not None and rm_critic is None:
            sharding.copy_weights(critic.trunk, policy.base_model)
    elif not cfg.fsdp:
        policy.load_state_dict(state["policy"])
        reference.load_state_dict(state["reference"])
        if critic is not None:
            critic.load_state_dict(state["critic"])
    if not cfg.fsdp:
        if critic is not None and cfg.critic_embedding == "frozen":  # after loading: shares only equal tables
            critic.freeze_embedding(score.model if isinstance(score, models.RewardModel) and rm_critic else reference)
        models.quantize(reference, cfg.ref_quant, cfg.quant_group_size)
        if d.world > 1 and critic is not None:
            train_critic = DistributedDataParallel(critic, device_ids=ddp_devices)
    full_kl = kl_full.FullVocabKL(cfg, ops, ref_lp)

    policy_opt = optim.adamw(policy.parameters(), lr=cfg.lr)
    critic_opt = optim.adamw(critic.parameters(), lr=cfg.critic_lr) if critic is not None else None
    sharded_models = {"policy": policy_lp, "reference": ref_lp, "critic": critic}
    sharded_optimizers = {"policy_opt": (policy_lp, policy_opt), "critic_opt": (critic, critic_opt)}
    moments, kl_coef, log_z_estimate, fdpg_baseline = RunningMoments(), cfg.kl_coef, RunningLogZ(), RunningMoments()
    start_step, metrics = 0, []
    if state is not None:
        if cfg.fsdp:
            sharding.load_sharded(checkpoint_dir / state["sharded"], sharded_models, sharded_optimizers)
        else:
            policy_opt.load_state_dict(state["policy_opt"])
            if critic_opt is not None:
                critic_opt.load_state_dict(state["critic_opt"])
        moments.load_state_dict(state["moments"])
        fdpg_baseline.load_state_dict(state["fdpg_baseline"])
        kl_coef = state["kl_coef"]
        log_z_estimate.load_state_dict(state["log_z"])
        start_step = state["step"]
        eval_before, examples_before = state["eval_before"], state["examples_before"]
        warmup_loss, warmup_time = state["warmup_loss"], state["warmup_time"]
        rng = torch.load(checkpoint_dir / f"rng_rank{d.rank}.pt", weights_only=False)
        generator.set_state(rng["generator"])
        sample_gen.set_state(rng["sample_gen"])
        torch.set_rng_state(rng["torch"])
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][:start_step]
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))

    local_prompts = cfg.batch_size // d.world
    progress = None
    if cfg.progress and d.main:
        from tqdm import tqdm

        progress = tqdm(total=cfg.total_steps, initial=start_step, desc="PPO", unit="step", dynamic_ncols=True)

    for step in range(start_step, cfg.total_steps):
        timings, step_start = {}, time.perf_counter()

        # ---- rollout: sample responses to a fresh batch of training prompts (group_size per prompt)
        t0 = time.perf_counter()
        prompts = [p for p in task.train_prompts(local_prompts, generator) for _ in range(cfg.group_size)]
        prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
        n_prompt = prompt_ids.shape[1]
        with sharding.gathered(policy_lp):
            rollout = models.generate(
                policy_lp,
                prompt_ids,
                prompt_mask,
                max_new_tokens=cfg.max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                temperature=cfg.temperature,
                generator=sample_gen,
                autocast=policy_lp.autocast,
                ops=ops,
                return_logprobs=cfg.rollout_logprobs,
            )
        response, response_mask = rollout[:2]
        input_ids, attention, labels = join(prompt_ids, prompt_mask, response, response_mask)
        mask = response_mask
        timings["generate"] = time.perf_counter() - t0

        # ---- scoring: reward, old and reference log-probs, values
        t0 = time.perf_counter()
        raw_scores = score(prompts, decode(tokenizer, response, response_mask)).to(device)
        with torch.no_grad():
            old_logp, entropy = (
                rollout[2:]
                if cfg.rollout_logprobs
                else policy_lp(input_ids, attention, labels, n_prompt, return_entropy=True)
            )
            ref_logp, ref_hidden = full_kl.reference_scores(input_ids, attention, labels, n_prompt)
            old_values = critic(input_ids, attention, n_prompt) if critic is not None else None
        timings["score"] = time.perf_counter() - t0

        # ---- advantages: shaped token rewards, then GAE (ppo) or group baselines (grpo / rloo)
        t0 = time.perf_counter()
        with torch.no_grad():
            token_kl = ops.kl_penalty(old_logp, ref_logp, cfg.kl_estimator) * mask
            seq_kl = (ops.kl_penalty(old_logp, ref_logp, "k1") * mask).sum(-1)
            if cfg.divergence is not None:
                seq_logp, seq_ref = (old_logp * mask).sum(-1), (ref_logp * mask).sum(-1)
                log_z = log_z_estimate.update(raw_scores / kl_coef + seq_ref - seq_logp, d)
                pseudo = fdpg_pseudo_reward(cfg.divergence, raw_scores, seq_logp, seq_ref, kl_coef, log_z)
                baseline = fdpg_baseline.mean if fdpg_baseline.count else 0.0
                fdpg_baseline.update(pseudo, d)
                scores = pseudo - baseline
            else:
                scores = raw_scores
                if cfg.reward_norm:
                    moments.update(raw_scores, d)
                    scores = ((raw_scores - moments.mean) / moments.std).clamp(-cfg.reward_clip, cfg.reward_clip)
            penalty = -kl_coef * token_kl if cfg.kl_in_reward else torch.zeros_like(token_kl)
            last = mask.sum(-1) - 1
            if critic is not None:
                rewards = penalty.clone()
                rewards[torch.arange(len(prompts), device=device), last] += scores
                advantages, returns = ops.gae(rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.lam)
                if cfg.whiten_advantages:
                    advantages = whiten(advantages, mask, d, ops)
            else:
                seq_scores = scores + penalty.sum(-1)
                group = (
                    ops.grpo_advantages(seq_scores, cfg.group_size)
                    if cfg.algo == "grpo"
                    else ops.rloo_advantages(seq_scores, cfg.group_size)
                )
                advantages, returns = group[:, None] * mask, None
        timings["advantages"] = time.perf_counter() - t0

        # ---- update: epochs x minibatches of the clipped policy loss and the clipped value loss
        t0 = time.perf_counter()
        policy_moves = step >= cfg.critic_warmup_steps or critic is None
        sums: dict[str, float] = {}
        count, epochs_done = 0, 0
        reads_ref_head = ref_hidden is not None  # the fused full-vocabulary KL reads the reference's lm head
        with sharding.gathered_root(ref_lp if reads_ref_head else None):
            for _ in range(cfg.ppo_epochs):
                approx_kls = []
                for mb in torch.randperm(len(prompts), generator=generator).to(device).split(cfg.minibatch_size):
                    loss, stats = torch.zeros((), device=device), {}
                    if policy_moves:
                        loss, stats = minibatch_policy_loss(
                            train_policy,
                            ops,
                            cfg,
                            kl_coef,
                            fused=policy_lp.fuses_policy_loss,
                            input_ids=input_ids[mb],
                            attention=attention[mb],
                            labels=labels[mb],
                            n_prompt=n_prompt,
                            old_logp=old_logp[mb],
                            advantages=advantages[mb],
                            mask=mask[mb],
                            ref_logp=ref_logp[mb],
                            full_kl=full_kl,
                            ref_hidden=None if ref_hidden is None else ref_hidden[mb],
                        )
                        approx_kls.append(stats["approx_kl"])
                        if cfg.ptx_coef > 0:
                            ptx = demonstration_loss(train_policy, task, tokenizer, len(mb), device, generator)
                            loss = loss + cfg.ptx_coef * ptx
                            stats["ptx_loss"] = ptx.item()
                    if train_critic is not None:
                        assert old_values is not None and returns is not None
                        values = train_critic(input_ids[mb], attention[mb], n_prompt)
                        v_loss, v_stats = ops.ppo_value_loss(
                            values, old_values[mb], returns[mb], mask[mb], clip=cfg.value_clip, agg=cfg.loss_agg
                        )
                        loss = loss + cfg.vf_coef * v_loss
                        stats.update(value_loss=v_loss.item(), value_clipfrac=v_stats["clipfrac"].item())
                    loss.backward()
                    if policy_moves:
                        stats["policy_grad_norm"] = optim.clip_and_step(
                            policy_opt, policy.parameters(), cfg.max_grad_norm
                        ).item()
                    if critic is not None and critic_opt is not None:
                        optim.clip_and_step(critic_opt, critic.parameters(), cfg.max_grad_norm)
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v
                    count += 1
                epochs_done += 1
                if cfg.target_kl is not None and approx_kls:
                    mean_kl = d.mean({"kl": sum(approx_kls) / len(approx_kls)})["kl"]
                    if mean_kl > 1.5 * cfg.target_kl:
                        break
        timings["update"] = time.perf_counter() - t0

        # ---- bookkeeping: metrics, adaptive KL, checkpoint
        step_time = time.perf_counter() - step_start
        n_tokens = d.sum(mask.sum().double()).item()
        row = {
            "step": step,
            "reward_mean": raw_scores.mean().item(),
            "kl": seq_kl.mean().item(),
            "entropy": ((entropy * mask).sum() / mask.sum()).item(),
            "response_len": mask.sum(-1).float().mean().item(),
            "policy_loss": float("nan"),
            "value_loss": float("nan"),
            "clipfrac": float("nan"),
            **{k: v / max(count, 1) for k, v in sums.items()},
        }
        row = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in d.mean(row).items()}
        row.update(
            step=step,
            kl_coef=kl_coef,
            epochs=epochs_done,
            tokens_per_s=n_tokens / step_time,
            **{f"time_{k}": v for k, v in timings.items()},
            time_step=step_time,
        )
        if cfg.divergence is not None:
            row["log_z"] = log_z_estimate.value
        metrics.append(row)
        if cfg.adaptive_kl:
            kl_coef = adaptive_kl_coef(kl_coef, row["kl"], cfg, cfg.batch_size * cfg.group_size)
        if d.main:
            with (out / "metrics.jsonl").open("a") as handle:
                handle.write(json.dumps(row) + "\n")
        if progress is not None:
            progress.update(1)
            progress.set_postfix(
                reward=f"{row['reward_mean']:.3f}",
                kl=f"{row['kl']:.3f}",
                gen=f"{timings['generate']:.2f}s",
                upd=f"{timings['update']:.2f}s",
            )
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.total_steps:
            models_state: dict[str, object]
            if cfg.fsdp:  # each process writes its shards; state.pt names the folder
                models_state = {
                    "sharded": sharding.save_sharded(checkpoint_dir, sharded_models, sharded_optimizers, step + 1)
                }
            else:
                models_state = {
                    "policy": policy.state_dict(),
                    "reference": reference.state_dict(),
                    "critic": critic.state_dict() if critic is not None else None,
                    "policy_opt": policy_opt.state_dict(),
                    "critic_opt": critic_opt.state_dict() if critic_opt is not None else None,
                }
            state = {
                "step": step + 1,
                **models_state,
                "moments": moments.state_dict(),
                "fdpg_baseline": fdpg_baseline.state_dict(),
                "kl_coef": kl_coef,
                "log_z": log_z_estimate.state_dict(),
                "eval_before": eval_before,
                "examples_before": examples_before,
                "warmup_loss": warmup_loss,
                "warmup_time": warmup_time,
            }
            rng = {
                "generator": generator.get_state(),
                "sample_gen": sample_gen.get_state(),
                "torch": torch.get_rng_state(),
            }
            save_checkpoint(checkpoint_dir, state, rng, d)
        yield row
    if progress is not None:
        progress.close()

    # ---- evaluation and outputs
    eval_after, examples_after = evaluate(policy_lp, task, tokenizer, score, cfg, device, d)
    param_bytes, optimizer_bytes = sharding.local_bytes(
        [policy_lp, ref_lp, critic, getattr(score, "model", None)], [policy_opt, critic_opt]
    )
    final_policy = sharding.full_state_dict(policy_lp, prefix="model.") if cfg.fsdp else None
    phase_means = {k: sum(m[f"time_{k}"] for m in metrics) / max(len(metrics), 1) for k in TIMED_PHASES}
    summary = {
        "eval_reward_before": eval_before,
        "eval_reward_after": eval_after,
        "eval_reward_gain": eval_after - eval_before,
        "wall_time_s": time.perf_counter() - wall_start,
        "warmup_time_s": warmup_time,
        "warmup_loss": warmup_loss,
        "steps": len(metrics),
        "resumed_at_step": start_step if resumed else None,
        "world_size": d.world,
        "fsdp": cfg.fsdp,
        "param_mb_per_rank": [b / 2**20 for b in d.gather(param_bytes)],
        "optimizer_mb_per_rank": [b / 2**20 for b in d.gather(optimizer_bytes)],
        "peak_rss_mb_per_rank": d.gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "phase_time_mean_s": phase_means,
        "examples_before": examples_before,
        "examples_after": examples_after,
        "config": dataclasses.asdict(cfg),
    }
    if d.main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if cfg.plot and metrics:
            plots.reward_kl(metrics, out / "reward_kl.png", cfg)
        policy.save_pretrained(out / "policy", state_dict=final_policy)
        tokenizer.save(out / "policy")
        print(
            f"eval reward (greedy, {len(task.eval_prompts())} held-out prompts): {eval_before:.3f} -> "
            f"{eval_after:.3f}; {len(metrics)} steps in {summary['wall_time_s']:.0f} s; mean phase times "
            + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in phase_means.items())
        )
    if d.world > 1:
        dist.barrier()
    return summary
