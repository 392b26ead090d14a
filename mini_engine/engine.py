"""The engine: config -> runner, then per step schedule -> run -> postprocess.

Generation runs on continuous batching (mini_engine.core) for every runner that implements
the paged contract: requests join and leave the running batch at any step, each with its
own sampling params. A runner with only the static contract gets static batching
(`generate_batch`), which also stays as the named baseline of the benchmarks.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence as Seq

import numpy as np

from .config import Config, load_config
from .core import BlockManager, Request, Scheduler, SchedulerConfig, SchedulerOutput
from .detokenizer import Detokenizer
from .errors import ConfigError, MiniEngineError, PromptTooLong
from .model.source import resolve_model
from .registry import get_backend
from .runner import Runner, RunnerConfig, StepInput
from .sampling import Sampler, SamplingParams, make_rng, sample_rows, token_logprobs
from .sequence import Completion, RequestOutput, Score, Sequence, TokenLogprob
from .tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("mini_engine.engine")


class Engine:
    """Generation over any registered backend.

    Engine(model="random:gpt2", backend="torch", device="cpu") or
    Engine.from_config("configs/cpu.toml", **{"backend.name": "onnxruntime"}).
    """

    def __init__(self, model: str | None = None, backend: str | None = None, device: str | None = None,
                 dtype: str | None = None, config: Config | None = None, **backend_options: Any):
        cfg = config or Config()
        overrides = {"model.source": model, "model.dtype": dtype, "backend.name": backend,
                     "backend.device": device}
        overrides.update({f"backend.options.{k}": v for k, v in backend_options.items()})
        self.config = load_config(cfg.to_dict(), **overrides)
        self.source = resolve_model(self.config.model.source)
        runner_cls = get_backend(self.config.backend.name)
        self.runner: Runner = runner_cls(RunnerConfig(
            model=self.source, device=self.config.backend.device, dtype=self.config.model.dtype,
            options=self.config.backend.options))
        self.tokenizer: Tokenizer = load_tokenizer(self.source)
        self.runner.load()
        self.num_steps = 0  # runner steps executed: benchmarks turn it into bandwidth achieved
        self.runner_s = 0.0  # time inside the runner's execute: the rest is engine overhead
        self.padded_tokens = 0  # static batching: left-padding positions computed at prefill
        self.peak_kv_usage = 0.0
        self.peak_static_kv_tokens = 0  # static batching: rows x padded length of the largest batch
        self.rows_stepped = 0  # continuous batching: sum over steps of the rows in each step
        self.scheduler: Scheduler | None = None
        self.kv_capacity = ""
        self.notes: list[str] = []  # what the engine changed from the config, and why
        self.static_reason = self.runner.paged_unsupported_reason()
        if self.static_reason is None:
            try:
                self._init_scheduler()
            except BaseException:
                self.runner.close()
                raise
        self._ids = itertools.count()
        self._foreign: list[RequestOutput] = []  # outputs generate() stepped for other requests

    def _init_scheduler(self) -> None:
        sc: SchedulerConfig = self.config.scheduler
        per_token = self.runner.kv_bytes_per_token
        window = self.max_positions
        if not sc.block_size:
            # The runner's choice, but at least 8 blocks per context window, so that a small model's
            # prompts still fill whole blocks for the prefix cache to share.
            sc = dataclasses.replace(sc, block_size=min(self.runner.preferred_block_size, max(16, window // 8)))
            self.config.scheduler = sc
        if self.runner.kv_layout == "slots":
            # One contiguous cache row per running sequence: memory is max_num_seqs windows (the
            # block pool only caps tokens in flight when num_kv_blocks asks for fewer), and a
            # block belongs to one sequence only, so there is no prefix cache to share.
            full = sc.max_num_seqs * -(-window // sc.block_size)
            blocks = min(sc.num_kv_blocks, full) if sc.num_kv_blocks else full
            if sc.enable_prefix_caching:
                sc = dataclasses.replace(sc, enable_prefix_caching=False)
                self.config.scheduler = sc
                self.notes.append(f"prefix caching is off: backend '{self.runner.name}' keeps one cache row "
                                  f"per sequence (kv layout 'slots')")
            self.kv_capacity = (f"KV cache: {sc.max_num_seqs} rows x {window} tokens "
                                f"({sc.max_num_seqs * window * per_token / 2**20:.0f} MiB, one row per running "
                                f"sequence), {blocks * sc.block_size} tokens in flight at most")
        else:
            blocks = sc.pool_blocks(per_token, window)
            tokens = blocks * sc.block_size
            self.kv_capacity = (f"KV cache: {blocks} blocks x {sc.block_size} tokens = {tokens} tokens "
                                f"({tokens * per_token / 2**20:.0f} MiB, {tokens / window:.1f} full context windows)")
        # Scheduler() checks the config against the window before the pool is allocated.
        self.scheduler = Scheduler(sc, BlockManager(blocks, sc.block_size, sc.enable_prefix_caching), window)
        self.runner.allocate_kv_pool(blocks, sc.block_size, sc.max_num_seqs)
        self.max_rows = sc.max_num_seqs  # a "slots" runner has this many cache rows, for good

    def set_max_num_seqs(self, n: int) -> int:
        """Change max_num_seqs of a running engine; capped where the runner keeps a row per sequence."""
        sc = self._require_scheduler().config
        if self.runner.kv_layout == "slots":
            n = min(n, self.max_rows)
        self.scheduler.config = dataclasses.replace(sc, max_num_seqs=n)
        return n

    @property
    def continuous(self) -> bool:
        """Whether generation runs on continuous batching (else static batching)."""
        return self.scheduler is not None

    def describe(self) -> dict[str, Any]:
        info = self.runner.describe()
        if self.scheduler is not None:
            sc = self.config.scheduler
            info["generation"] = {"mode": "continuous batching", "kv_capacity": self.kv_capacity,
                                  "kv_layout": self.runner.kv_layout, "notes": self.notes,
                                  "max_num_seqs": sc.max_num_seqs,
                                  "max_num_batched_tokens": sc.max_num_batched_tokens,
                                  "chunked_prefill": sc.enable_chunked_prefill,
                                  "prefix_caching": sc.enable_prefix_caching, "block_size": sc.block_size}
        else:
            info["generation"] = {"mode": "static batching", "reason": self.static_reason}
        return info

    @classmethod
    def from_config(cls, path_or_dict: str | Path | Mapping[str, Any] | None = None,
                    overrides: Seq[str] = (), **sections: Any) -> "Engine":
        """`sections` are dotted keys (`**{"backend.name": "torch"}`) or model/backend/device/dtype."""
        short = {k: sections.pop(k) for k in ("model", "backend", "device", "dtype") if k in sections}
        cfg = load_config(path_or_dict, overrides, **sections)
        return cls(config=cfg, **short)

    # ----- lifecycle -----------------------------------------------------------
    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def max_positions(self) -> int:
        return self.source.config.n_positions

    # ----- public API ----------------------------------------------------------
    def sampling_params(self, **overrides: Any) -> SamplingParams:
        """The config's generation defaults with `overrides` (None values ignored)."""
        base = self.config.generation.__dict__ | {k: v for k, v in overrides.items() if v is not None}
        return load_config({"generation": base}).generation

    def generate(self, prompts: str | Seq[str], params: SamplingParams | None = None,
                 **sampling: Any) -> list[Completion]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if params is None:
            params = self.sampling_params(**sampling)
        elif sampling:
            raise ConfigError("pass either params or sampling keywords, not both")
        encoded = [self.encode_prompt(p, params) for p in prompts]
        if self.scheduler is not None:
            return self._generate_continuous(prompts, encoded, params)
        out: list[Completion] = []
        step = self.config.batching.max_batch_size
        for start in range(0, len(prompts), step):
            chunk = list(range(start, min(start + step, len(prompts))))
            seqs = [Sequence(i, prompts[i], encoded[i]) for i in chunk]
            out.extend(self.generate_batch(seqs, params))
        return out

    def _generate_continuous(self, prompts, encoded, params: SamplingParams) -> list[Completion]:
        ids: list[str] = []
        done: dict[str, Completion] = {}
        try:
            for i, (text, tokens) in enumerate(zip(prompts, encoded)):
                ids.append(self.add_request(None, tokens, params.for_prompt(i), text=text).request_id)
            mine = set(ids)
            while len(done) < len(ids):
                failed = None
                for out in self.step():
                    if out.request_id not in mine:
                        self._foreign.append(out)  # another caller's: its next step() returns it
                    elif out.error is not None:
                        failed = failed or out  # raised once the step's outputs are all filed
                    elif out.finished:
                        done[out.request_id] = out.completion
                if failed is not None:
                    raise MiniEngineError(f"request {failed.request_id} failed: {failed.error}")
        except BaseException:
            for rid in ids:
                self.abort_request(rid)
            raise
        return [done[rid] for rid in ids]

    # ----- the request-level API (continuous batching) ---------------------------------
    def add_request(self, request_id: str | None, prompt: str | Seq[int], params: SamplingParams | None = None,
                    arrival_s: float | None = None, text: str | None = None) -> Request:
        """Queue a request (a prompt string or token ids) with its own sampling params.

        `text`: the prompt's text when `prompt` is its token ids (what the Completion reports).
        """
        sched = self._require_scheduler()
        params = params or self.sampling_params()
        if isinstance(prompt, str):
            text, ids = prompt, self.encode_prompt(prompt, params)
        else:
            ids = self.check_prompt_ids(prompt, params)
        if request_id is None:
            rid = f"req-{next(self._ids)}"
            while rid in sched.requests:  # a caller may have named one of its requests like that
                rid = f"req-{next(self._ids)}"
        else:
            rid = str(request_id)
        req = Request(rid, ids, params, prompt=text,
                      arrival_s=time.perf_counter() if arrival_s is None else arrival_s)
        if not params.greedy:
            req.generator = make_rng(params.seed)
        if params.logprobs is not None:
            req.logprobs = []
        req.state = Detokenizer(self.tokenizer, params.stop)
        sched.add_request(req)
        return req

    def abort_request(self, request_id: str) -> Request | None:
        """Stop a request wherever it is; its KV blocks are freed at once."""
        return self._require_scheduler().abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler is not None and self.scheduler.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        """One scheduling round: schedule -> run -> postprocess. Returns what each request got.

        A request whose row fails (in the runner, the sampler or the detokenizer) ends alone with
        finish_reason "error"; the others go on. Only a runner that reports itself broken
        (Runner.health_problem) stops the engine: the exception propagates."""
        sched = self._require_scheduler()
        earlier, self._foreign = self._foreign, []
        plan = sched.schedule()
        if plan.is_empty:
            return earlier
        t = time.perf_counter()
        try:
            logits, failed, told = self._run_isolated(plan)
        except BaseException:
            sched.restore_freed(plan.freed)  # the runner has not seen them
            raise
        if not told:
            sched.restore_freed(plan.freed)  # no run of the step succeeded with them: the next one says
        self.runner_s += time.perf_counter() - t
        self.num_steps += 1
        self.peak_kv_usage = max(self.peak_kv_usage, sched.block_manager.usage)
        self.rows_stepped += len(plan.seqs)
        outputs = [self._fail(s.request, e) for s in plan.seqs if (e := failed.get(s.request_id)) is not None]
        sched.update_from_output(plan)
        reqs = [s.request for s in plan.seqs if s.needs_logits and s.request_id not in failed]
        return earlier + outputs + (self._postprocess_step(reqs, logits) if reqs else [])

    def _run_isolated(self, plan: SchedulerOutput) -> tuple[np.ndarray | None, dict[str, Exception], bool]:
        """Run the plan; if the runner raises, run each half alone (recursively) to find the rows
        that fail by themselves. Returns the logits of the rows that ran (in plan order), the
        failed request ids with their exception, and whether a run that succeeded told the runner
        of plan.freed (a run that raises leaves the runner as it was: the next run must say it)."""
        try:
            return self.runner.execute_paged(plan.to_step()), {}, True
        except Exception as e:  # noqa: BLE001 - attributed to rows below, or re-raised
            if self.runner.health_problem() is not None:
                raise
            if len(plan.seqs) == 1:
                return None, {plan.seqs[0].request_id: e}, False
        half = len(plan.seqs) // 2
        parts, failed, freed = [], {}, plan.freed
        for seqs in (plan.seqs[:half], plan.seqs[half:]):
            logits, f, told = self._run_isolated(dataclasses.replace(plan, seqs=seqs, freed=freed))
            failed |= f
            if told:
                freed = []
            if logits is not None:
                parts.append(np.array(logits))  # a copy: the runner may reuse its output buffer
        return (np.concatenate(parts) if parts else None), failed, not freed

    def _fail(self, req: Request, e: BaseException) -> RequestOutput:
        """End `req` on an error of its own; its KV is freed and its caller told."""
        log.error("request %s failed: %s: %s", req.request_id, type(e).__name__, e)
        req.finish_s = time.perf_counter()
        self.scheduler.finish_request(req, "error")
        return RequestOutput(req.request_id, [], "", True, "error", self._request_completion(req),
                             error=f"{type(e).__name__}: {e}")

    def _sample(self, logits: np.ndarray, reqs: list[Request], no_eos: list[int],
                eos: int) -> tuple[list[int | None], dict[int, Exception]]:
        """Each row's next token; rows whose sampling raises get None and their exception."""
        params = [r.params for r in reqs]
        gens = [r.generator for r in reqs]
        states = [None if g is None else g.bit_generator.state for g in gens]
        try:
            return sample_rows(logits, params, gens, no_eos, eos), {}
        except Exception:  # noqa: BLE001 - find the row(s) at fault, one at a time
            pass
        for g, st in zip(gens, states):  # the rows before the fault drew already: draw again the same
            if g is not None:
                g.bit_generator.state = st
        tokens: list[int | None] = []
        failed: dict[int, Exception] = {}
        for i in range(len(reqs)):
            try:
                tokens.append(sample_rows(logits[i:i + 1], params[i:i + 1], gens[i:i + 1],
                                          [0] if i in no_eos else [], eos)[0])
            except Exception as e:  # noqa: BLE001
                tokens.append(None)
                failed[i] = e
        return tokens, failed

    def _postprocess_step(self, reqs: list[Request], logits: np.ndarray) -> list[RequestOutput]:
        eos = self.tokenizer.eos_token_id
        params = [r.params for r in reqs]
        # min_tokens: a row short of it cannot sample EOS (its logit counts as -inf), as in vLLM
        # and transformers' MinNewTokensLengthLogitsProcessor.
        no_eos = [i for i, (r, p) in enumerate(zip(reqs, params))
                  if p.min_tokens and p.min_tokens > len(r.output_ids) and not p.ignore_eos]
        tokens, failed = self._sample(logits, reqs, no_eos, eos)
        # Logprobs of the raw logits (sample_rows masks copies), computed for the rows that ask only.
        step_lps: list[TokenLogprob | None] | None = None
        asked = [i for i, p in enumerate(params) if p.logprobs is not None and i not in failed]
        if asked:
            step_lps = [None] * len(reqs)
            got = token_logprobs(logits[asked], [tokens[i] for i in asked], [params[i].logprobs for i in asked])
            for i, lp in zip(asked, got):
                step_lps[i] = lp
        now = time.perf_counter()
        outputs = []
        for i, (req, token) in enumerate(zip(reqs, tokens)):
            if req.finished:
                continue  # aborted while its step ran
            if i in failed:
                outputs.append(self._fail(req, failed[i]))
                continue
            try:
                outputs.append(self._append_token(req, token, None if step_lps is None else step_lps[i], now))
            except Exception as e:  # noqa: BLE001 - this request's failure, not the step's
                outputs.append(self._fail(req, e))
        return outputs

    def _append_token(self, req: Request, token: int, lp: TokenLogprob | None, now: float) -> RequestOutput:
        """Record one sampled token of `req`: stop checks, stream delta, and the end if it came."""
        if not req.output_ids:
            req.first_token_s = now
        req.append_output(token)
        req.token_s.append(now)
        lps = None
        if lp is not None:
            lps = [lp]
            req.logprobs.append(lp)
        detok: Detokenizer = req.state
        p = req.params
        reason = None
        if token == self.tokenizer.eos_token_id and not p.ignore_eos:
            reason = "stop"  # the EOS token is returned, its text is not
        elif detok.push(token, check_stop=len(req.output_ids) >= p.min_tokens):
            reason = "stop"
        elif len(req.output_ids) >= p.max_new_tokens or req.num_tokens >= self.max_positions:
            reason = "length"
        if reason is None:
            return RequestOutput(req.request_id, [token], detok.delta(), logprobs=lps)
        req.finish_s = now
        detok.flush()
        self.scheduler.finish_request(req, reason)
        return RequestOutput(req.request_id, [token], detok.delta(final=True), True, reason,
                             self._request_completion(req), logprobs=lps)

    def _request_completion(self, req: Request) -> Completion:
        t0 = req.arrival_s
        end = req.finish_s or time.perf_counter()
        return Completion(prompt=req.prompt if req.prompt is not None else self.tokenizer.decode(req.prompt_ids),
                          text=req.state.text, token_ids=list(req.output_ids), prompt_token_ids=list(req.prompt_ids),
                          finish_reason=req.finish_reason, ttft_ms=((req.first_token_s or end) - t0) * 1e3,
                          total_ms=(end - t0) * 1e3, token_times_ms=[(t - t0) * 1e3 for t in req.token_s],
                          queue_ms=((req.first_scheduled_s or end) - t0) * 1e3,
                          cached_prompt_tokens=req.num_cached_prompt,
                          preemptions=req.num_preemptions,
                          logprobs=None if req.logprobs is None else list(req.logprobs))

    def stats(self) -> dict[str, Any]:
        """Scheduler and KV counters (running/waiting, KV usage, prefix-cache hits, preemptions)."""
        out = self.scheduler.stats() if self.scheduler is not None else {}
        return out | {"steps": self.num_steps, "runner_s": self.runner_s, "peak_kv_usage": self.peak_kv_usage,
                      "rows_stepped": self.rows_stepped, "padded_tokens": self.padded_tokens}

    def _require_scheduler(self) -> Scheduler:
        if self.scheduler is None:
            raise MiniEngineError(f"the request API needs continuous batching, which this runner lacks: "
                                  f"{self.static_reason}")
        return self.scheduler

    def check_prompt_ids(self, ids: Seq[int], params: SamplingParams) -> list[int]:
        """Token ids as a prompt: in the vocabulary, non-empty, and within the context window."""
        vocab = self.source.config.vocab_size
        try:
            ids = [int(i) for i in ids]
        except (TypeError, ValueError):
            raise ConfigError("a token-id prompt must be a list of integers") from None
        if not ids:
            raise ConfigError("a token-id prompt must not be empty")
        if min(ids) < 0 or max(ids) >= vocab:
            raise ConfigError(f"prompt token ids must be in 0..{vocab - 1}")
        return self._fit_window(ids, params)

    def encode_prompt(self, prompt: str, params: SamplingParams) -> list[int]:
        if not isinstance(prompt, str):
            raise ConfigError(f"a prompt must be a string, got {type(prompt).__name__}")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ConfigError(f"the prompt is not valid Unicode text (a lone surrogate at character {e.start}); "
                              f"send UTF-8 text") from None
        ids = self.tokenizer.encode(prompt) or [self.tokenizer.eos_token_id]
        return self._fit_window(ids, params)

    def _fit_window(self, ids: list[int], params: SamplingParams) -> list[int]:
        # As vLLM's API does: the prompt and every requested new token must fit the context
        # window, so a generation never stops short at the window unless truncation was asked
        # for, and then the prompt (not the generation) gives way.
        window, wanted = self.max_positions, params.max_new_tokens
        room = window - wanted
        if len(ids) <= room:
            return ids
        if room < 1:
            raise PromptTooLong(f"max_new_tokens {wanted} leaves no room for a prompt in the model's "
                                f"context window of {window} tokens; ask for at most {window - 1}")
        if not params.truncate:
            raise PromptTooLong(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({wanted}) = {len(ids) + wanted} tokens, "
                f"beyond the model's context window of {window}; shorten the prompt, lower max_new_tokens, "
                f"or enable truncation (--truncate) to keep the prompt's last {room} tokens")
        return ids[-room:]

    def score(self, prompts: str | Seq[str], top_k: int = 5, truncate: bool = False) -> list[Score]:
        """One forward pass per prompt: the next token's top_k ids, log-probabilities and logits."""
        if isinstance(prompts, str):
            prompts = [prompts]
        # Scoring reads the next token's logits and generates nothing: reserve one position, not
        # the config's max_new_tokens.
        params = self.sampling_params(truncate=truncate, max_new_tokens=1, min_tokens=0)
        seqs = [Sequence(i, p, self.encode_prompt(p, params)) for i, p in enumerate(prompts)]
        step = self.config.batching.max_batch_size
        return [s for start in range(0, len(seqs), step) for s in self.score_batch(seqs[start:start + step], top_k)]

    # ----- one batch: schedule -> run -> postprocess ---------------------------
    def score_batch(self, seqs: list[Sequence], top_k: int = 5) -> list[Score]:
        vocab = self.source.config.vocab_size
        if not 1 <= top_k <= vocab:
            raise ConfigError(f"top_k must be in 1..{vocab}, got {top_k}")
        prompt_len = max(len(s.prompt_ids) for s in seqs)
        self.runner.allocate_kv(len(seqs), prompt_len)
        try:
            logits = self._execute(prefill_step(seqs, prompt_len))
        finally:
            self.runner.free_kv()
        return [top_k_score(s, row, top_k) for s, row in zip(seqs, logits)]

    def generate_batch(self, seqs: list[Sequence], params: SamplingParams,
                       on_finish: Callable[[int, Completion], None] | None = None) -> list[Completion]:
        """Generate for `seqs` together; on_finish(i, completion) fires as soon as row i is done."""
        t0 = time.perf_counter()
        prompt_len = max(len(s.prompt_ids) for s in seqs)
        wanted = [s.max_new_tokens or params.max_new_tokens for s in seqs]
        max_len = min(prompt_len + max(wanted), self.max_positions)
        # Rows share the padded prompt length, so the context window caps every row alike.
        budgets = [min(w, max_len - prompt_len) for w in wanted]
        self.padded_tokens += len(seqs) * prompt_len - sum(len(s.prompt_ids) for s in seqs)
        self.peak_static_kv_tokens = max(self.peak_static_kv_tokens, len(seqs) * max_len)
        seeds = [None if params.seed is None else params.seed + s.index for s in seqs]
        sampler = Sampler(params, seeds)
        eos = None if params.ignore_eos else self.tokenizer.eos_token_id
        done: dict[int, Completion] = {}
        self._start_static(seqs, params)
        self.runner.allocate_kv(len(seqs), max_len)
        try:
            step = prefill_step(seqs, prompt_len)
            mask = step.attention_mask
            active = list(range(len(seqs)))
            while True:
                logits = self._execute(step)
                tokens, lps = self._sample_static(sampler, logits, seqs, active, params, eos)
                now = time.perf_counter()
                still = self._postprocess(seqs, active, tokens, params, eos, budgets, now, lps)
                for row in active:
                    if seqs[row].finished:
                        done[row] = self._completion(seqs[row], t0)
                        if on_finish is not None:
                            on_finish(row, done[row])
                active = still
                if not active:
                    break
                step, mask = decode_step(seqs, active, mask, prompt_len)
        finally:
            self.runner.free_kv()
        return [done[i] for i in range(len(seqs))]

    def generate_uncached(self, seq: Sequence, params: SamplingParams) -> Completion:
        """The naive baseline: one request and no KV cache, so every new token re-runs the whole
        sequence. Benchmarks compare it with generate_batch to show what caching and batching buy."""
        t0 = time.perf_counter()
        n_prompt = len(seq.prompt_ids)
        max_len = min(n_prompt + params.max_new_tokens, self.max_positions)
        sampler = Sampler(params, [None if params.seed is None else params.seed + seq.index])
        eos = None if params.ignore_eos else self.tokenizer.eos_token_id
        self._start_static([seq], params)
        self.runner.allocate_kv(1, max_len)
        try:
            while not seq.finished:
                ids = np.array([seq.prompt_ids + seq.output_ids], dtype=np.int64)
                t = ids.shape[1]
                step = StepInput(ids, np.arange(t, dtype=np.int64)[None], np.ones_like(ids), slot_ids=[0],
                                 past_len=0)
                tokens, lps = self._sample_static(sampler, self._execute(step), [seq], [0], params, eos)
                self._postprocess([seq], [0], tokens, params, eos, [max_len - n_prompt], time.perf_counter(), lps)
        finally:
            self.runner.free_kv()
        return self._completion(seq, t0)

    def _execute(self, step: StepInput) -> np.ndarray:
        self.num_steps += 1
        t = time.perf_counter()
        try:
            return self.runner.execute(step)
        finally:
            self.runner_s += time.perf_counter() - t

    @staticmethod
    def _start_static(seqs: list[Sequence], params: SamplingParams) -> None:
        for s in seqs:
            s.logprobs = [] if params.logprobs is not None else None
            s.stop_from = 0

    def _sample_static(self, sampler: Sampler, logits: np.ndarray, seqs: list[Sequence], active: list[int],
                       params: SamplingParams, eos: int | None) -> tuple[np.ndarray, list[TokenLogprob] | None]:
        """The rows' next tokens (EOS banned while short of min_tokens) and, if asked, their logprobs
        of the raw logits. Static rows advance in lockstep: they all have as many output tokens."""
        short = params.min_tokens > len(seqs[active[0]].output_ids)
        tokens = sampler(logits, active, ban=eos if short else None)
        if params.logprobs is None:
            return tokens, None
        return tokens, token_logprobs(logits, tokens, [params.logprobs] * len(active))

    def _postprocess(self, seqs, active, tokens, params, eos, budgets, now, lps=None) -> list[int]:
        """Record each row's new token; return the rows that go on (budgets: new tokens per row)."""
        still = []
        for i, (row, token) in enumerate(zip(active, tokens.tolist())):
            seq = seqs[row]
            if not seq.output_ids:
                seq.first_token_s = now
            seq.output_ids.append(token)
            seq.token_s.append(now)
            if lps is not None:
                seq.logprobs.append(lps[i])
            n = len(seq.output_ids)
            if token == eos:
                seq.finish_reason = "stop"
            elif params.stop and n >= params.min_tokens and self._hit_stop(seq, params.stop, params.min_tokens):
                seq.finish_reason = "stop"
            elif len(seq.output_ids) >= budgets[row]:
                seq.finish_reason = "length"
            if seq.finished:
                seq.finish_s = now
            else:
                still.append(row)
        return still

    def _hit_stop(self, seq: Sequence, stops: list[str], min_tokens: int = 0) -> bool:
        if min_tokens > 1 and len(seq.output_ids) == min_tokens:
            # As the continuous path's Detokenizer: a stop string is looked for from the text the
            # first min_tokens - 1 tokens made, less what could begin one (the longest, less a char).
            before = len(self.tokenizer.decode(seq.output_ids[:min_tokens - 1]))
            seq.stop_from = max(0, before - (max(len(s) for s in stops) - 1))
        text = self.tokenizer.decode(seq.output_ids)
        cut = min((i for i in (text.find(s, seq.stop_from) for s in stops) if i >= 0), default=-1)
        if cut < 0:
            return False
        seq.text = text[:cut]
        return True

    def _completion(self, seq: Sequence, t0: float) -> Completion:
        ids = seq.output_ids
        text = seq.text
        if text is None:
            shown = ids[:-1] if ids and ids[-1] == self.tokenizer.eos_token_id else ids
            text = self.tokenizer.decode(shown)
        return Completion(prompt=seq.prompt, text=text, token_ids=list(ids),
                          prompt_token_ids=list(seq.prompt_ids), finish_reason=seq.finish_reason,
                          ttft_ms=(seq.first_token_s - t0) * 1e3, total_ms=(seq.finish_s - t0) * 1e3,
                          token_times_ms=[(t - t0) * 1e3 for t in seq.token_s],
                          logprobs=None if seq.logprobs is None else list(seq.logprobs))


def prefill_step(seqs: list[Sequence], prompt_len: int) -> StepInput:
    """Left-pad the prompts to `prompt_len`; positions count real tokens only."""
    b = len(seqs)
    ids = np.zeros((b, prompt_len), dtype=np.int64)
    mask = np.zeros((b, prompt_len), dtype=np.int64)
    for i, s in enumerate(seqs):
        n = len(s.prompt_ids)
        ids[i, prompt_len - n:] = s.prompt_ids
        mask[i, prompt_len - n:] = 1
    # GPT-2 has learned absolute positions: a padded row must see 0..n-1 exactly
    # as the same prompt alone would.
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return StepInput(ids, pos, mask, slot_ids=list(range(b)), past_len=0)


def decode_step(seqs: list[Sequence], active: list[int], full_mask: np.ndarray,
                prompt_len: int) -> tuple[StepInput, np.ndarray]:
    """One new token for each active row; `full_mask` covers every row of the batch."""
    past = full_mask.shape[1]
    full_mask = np.concatenate([full_mask, np.ones((full_mask.shape[0], 1), dtype=np.int64)], axis=1)
    ids = np.array([[seqs[r].output_ids[-1]] for r in active], dtype=np.int64)
    pos = np.array([[len(seqs[r].prompt_ids) + len(seqs[r].output_ids) - 1] for r in active], dtype=np.int64)
    return StepInput(ids, pos, full_mask[active], slot_ids=active, past_len=past), full_mask


def top_k_score(seq: Sequence, logits: np.ndarray, k: int) -> Score:
    """The k most likely next tokens of one row of last-position logits [V]."""
    top = np.argpartition(-logits, k - 1)[:k]
    top = top[np.argsort(-logits[top], kind="stable")]
    m = logits.max()
    log_z = m + np.log(np.exp(logits.astype(np.float64) - m).sum())
    return Score(prompt=seq.prompt, prompt_token_ids=list(seq.prompt_ids), top_ids=top.tolist(),
                 top_logprobs=(logits[top] - log_z).tolist(), top_logits=logits[top].tolist())
