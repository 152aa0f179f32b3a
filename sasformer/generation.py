"""Loading a trained model for inference and a plain cached decoding loop.

Reads both layouts a model can be saved in, without needing ``transformers``:

- a training checkpoint: ``model.safetensors`` (``DecoderLM`` names; a tied LM head stored once as
  ``embed.weight``) and ``config.json`` holding the ``ModelConfig`` dict, bare or under ``"model"``;
- a Hugging Face export: ``config.json`` with ``"model_type": "sasformer"`` and ``model.safetensors``
  (or shards with ``model.safetensors.index.json``) under ``SASFormerForCausalLM`` names.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sasformer.layers.base import AttentionContext
from sasformer.layers.sas_decode import prepare_decode, sas_layers
from sasformer.models.config import ModelConfig
from sasformer.models.decoder import DecoderLM
from sasformer.ops.linear import drop_concats, fused_groups, keep_concats
from sasformer.utils.vocab import vocab_extent

MODEL_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_META = "sasformer_tokenizer.json"
_HF_ONLY_PREFIX = "model."


def read_config_file(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{path} not found: --model/--checkpoint must be a directory with config.json and weights")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def model_config_from_dict(data: dict[str, Any], source: str = "config") -> ModelConfig:
    """A ``ModelConfig`` from a bare ModelConfig dict, a ``{"model": {...}}`` dict or a HF sasformer config."""
    if isinstance(data.get("model"), dict):
        data = data["model"]
    elif data.get("model_type") is not None:
        if data["model_type"] != "sasformer":
            raise ValueError(f"{source}: model_type={data['model_type']!r} is not a sasformer model")
        names = set(ModelConfig.__dataclass_fields__) - {"tie_embeddings"}
        fields = {k: v for k, v in data.items() if k in names}
        return ModelConfig.from_dict({**fields, "tie_embeddings": bool(data.get("tie_word_embeddings", True))})
    try:
        return ModelConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from None


def is_hf_export(model_dir: str | Path) -> bool:
    return read_config_file(model_dir).get("model_type") == "sasformer"


def _read_weights(model_dir: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if (model_dir / MODEL_FILE).is_file():
        return load_file(str(model_dir / MODEL_FILE))
    if (model_dir / INDEX_FILE).is_file():
        shards = sorted(set(json.loads((model_dir / INDEX_FILE).read_text())["weight_map"].values()))
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(load_file(str(model_dir / shard)))
        return state
    raise ValueError(f"{model_dir} has neither {MODEL_FILE} nor {INDEX_FILE}")


def decoder_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Normalise parameter names to ``DecoderLM``'s: drop HF ``model.`` and ``torch.compile``/DDP prefixes."""
    out = {}
    for name, value in state.items():
        stripped = None
        while stripped != name:  # the wrappers nest in either order (DDP around a compiled model, or inside)
            stripped, name = name, name.removeprefix("_orig_mod.").removeprefix("module.")
        name = name.removeprefix(_HF_ONLY_PREFIX)
        out[name] = value
    return out


def load_decoder(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> DecoderLM:
    """``DecoderLM`` with the weights of a training checkpoint or a HF export directory."""
    model_dir = Path(model_dir)
    config = model_config_from_dict(read_config_file(model_dir), str(model_dir / CONFIG_FILE))
    state = decoder_state_dict(_read_weights(model_dir))
    with torch.device("meta"):
        model = DecoderLM(config)
    expected = set(model.state_dict())
    optional = {"lm_head.weight"} if config.tie_embeddings else set()
    missing, unexpected = sorted(expected - set(state) - optional), sorted(set(state) - expected)
    shapes = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} != {tuple(shapes[k].shape)}" for k, v in state.items()
             if k in shapes and v.shape != shapes[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"weights in {model_dir} do not match its config (attention={config.attention!r}): "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}"
        )
    model.load_state_dict(state, strict=False, assign=True)
    model.rotary.build()  # non-persistent RoPE tables are not in the weights
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.to(device=device, dtype=dtype).eval()


def sample_next(logits_BV: Tensor, temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Next token ids (B,) from last-position logits; ``temperature`` 0 is greedy."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 or None = every token)")
    if temperature < torch.finfo(torch.float32).tiny or top_k == 1:  # 0, or so small it rounds to 0 in fp32
        return logits_BV.argmax(dim=-1)
    logits = logits_BV.float()
    # the largest logit at 0 first: a tiny temperature then sends the rest to -inf, never inf - inf = NaN
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


def use_static_decoder(on_cuda: bool, unpadded: bool, max_new_tokens: int) -> bool:
    """:func:`generate`'s automatic choice: the static decoder (a CUDA graph per step) for unpadded prompts
    on CUDA, where decoding token by token through the ordinary forward is bound by kernel launches; it
    needs two new tokens or more to repay capturing the graph."""
    return on_cuda and unpadded and max_new_tokens > 1


def _next_tokens(logits_BV: Tensor, done_B: Tensor, temperature: float, top_k: int | None,
                 generator: torch.Generator | None, vocab_limit: int | None, eos_id: int | None) -> Tensor:
    """Sample the next ids (B,) and mark the rows that produced ``eos_id`` in ``done_B`` (in place);
    rows already done get ``eos_id`` again."""
    if vocab_limit is not None and vocab_limit < logits_BV.shape[-1]:
        logits_BV = logits_BV.clone()  # the static decoder's logits are its graph's output buffer
        logits_BV[:, vocab_limit:] = float("-inf")
    nxt = sample_next(logits_BV, temperature, top_k, generator)
    if eos_id is not None:
        nxt = nxt.masked_fill(done_B, eos_id)
        done_B |= nxt == eos_id
    return nxt


@torch.no_grad()
def generate(
    model: DecoderLM,
    input_ids: Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    attention_mask: Tensor | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    vocab_limit: int | None = None,
    static: bool | None = None,
) -> Tensor:
    """Prefill ``input_ids`` (B, T; left-padded when ``attention_mask`` has zeros), then decode token by
    token with a preallocated cache. Returns (B, T + n) with n <= ``max_new_tokens`` (stops early once
    every row has produced ``eos_id``; rows that finished are padded with ``eos_id``). ``vocab_limit``
    keeps ids below it (a tokenizer smaller than the model's padded vocabulary).

    ``static``: decode with a :class:`StaticDecoder` (fixed shapes, one CUDA graph replayed per token on
    CUDA, run eagerly elsewhere); it needs unpadded prompts. None (the default) takes it where
    :func:`use_static_decoder` says it pays: unpadded prompts on CUDA."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    B, T = input_ids.shape
    unpadded = attention_mask is None or bool(attention_mask.all())
    if static is None:
        static = use_static_decoder(input_ids.is_cuda, unpadded, max_new_tokens)
    if static and not unpadded:
        raise ValueError("static=True needs unpadded prompts (an attention_mask of ones, or none)")
    pick = dict(temperature=temperature, top_k=top_k, generator=generator, vocab_limit=vocab_limit, eos_id=eos_id)
    tokens = [input_ids]
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    if static and max_new_tokens > 0:
        decoder = StaticDecoder(model, B, T + max_new_tokens, cuda_graph=input_ids.is_cuda)
        logits = decoder.prefill(input_ids)
        for i in range(max_new_tokens):
            nxt = _next_tokens(logits, done, **pick)
            tokens.append(nxt[:, None])
            if (eos_id is not None and bool(done.all())) or i + 1 == max_new_tokens:
                break
            logits = decoder.step(nxt[:, None])
        return torch.cat(tokens, dim=1)
    cache = model.new_cache(capacity=T + max_new_tokens)
    mask = attention_mask
    step_ids = input_ids
    for _ in range(max_new_tokens):
        logits = model(step_ids, attention_mask=mask, cache=cache)[:, -1]
        nxt = _next_tokens(logits, done, **pick)
        tokens.append(nxt[:, None])
        step_ids = nxt[:, None]
        if mask is not None:
            mask = torch.cat((mask, mask.new_ones(B, 1)), dim=1)
        # checking costs a device sync, so only when it can end the loop
        if eos_id is not None and bool(done.all()):
            break
    return torch.cat(tokens, dim=1)


class _JsonTokenizer:
    """A ``tokenizers`` JSON file behind the encode/decode/eot_id interface (used when
    ``sasformer.data`` is not available)."""

    kind = "tokenizers"

    def __init__(self, path: Path, eot_token: str | None = None) -> None:
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception for bad files
            raise ValueError(f"cannot read tokenizer file {path}: {err}") from None
        names = [eot_token] if eot_token else ["<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"]
        ids = [self._tok.token_to_id(n) for n in names if n is not None]
        found = [(n, i) for n, i in zip(names, ids) if i is not None]
        self.eot_token, self.eot_id = found[0] if found else (None, None)
        self.vocab_size = vocab_extent(self._tok.get_vocab(with_added_tokens=True).values())

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def load_text_tokenizer(spec: str | Path) -> Any:
    """A tokenizer with ``encode``/``decode``/``eot_id``: a saved tokenizer folder, a ``.json``
    (``tokenizers``) or ``.tiktoken`` file; through :func:`sasformer.data.tokenizer.load_tokenizer`
    when that module is available, else ``tokenizers`` JSON only."""
    try:
        from sasformer.data.tokenizer import load_tokenizer
    except ImportError:
        path = Path(spec)
        if path.is_dir() and (path / TOKENIZER_META).is_file():
            meta = json.loads((path / TOKENIZER_META).read_text())
            if meta.get("kind") == "tokenizers":
                return _JsonTokenizer(path / meta["file"], meta.get("eot_token"))
        if path.is_file() and path.suffix == ".json":
            return _JsonTokenizer(path)
        raise ValueError(
            f"cannot load tokenizer {spec}: without sasformer.data only a tokenizers .json file (or a saved "
            "folder of that kind) is supported"
        ) from None
    return load_tokenizer(spec)


def find_tokenizer(model_dir: str | Path) -> Path | None:
    """Where the tokenizer of a saved model is: ``MODEL/tokenizer/``, the training run's
    ``data_dir/tokenizer/`` (from a checkpoint's config), or a HF ``tokenizer.json`` in ``MODEL``."""
    model_dir = Path(model_dir)
    candidates = [model_dir / TOKENIZER_DIR]
    data_dir = read_config_file(model_dir).get("train", {}).get("data_dir")
    if data_dir:
        candidates.append(Path(data_dir) / TOKENIZER_DIR)
    candidates.append(model_dir / "tokenizer.json")
    for path in candidates:
        if (path.is_dir() and (path / TOKENIZER_META).is_file()) or path.is_file():
            return path
    return None


class StaticDecoder:
    """Greedy/sampled decoding one token per step with fixed tensor shapes, optionally as a CUDA graph.

    Every step attends over the whole preallocated cache (``capacity`` slots) with a mask of the
    slots written so far, writes the new keys/values at a device-side position, and rebuilds
    nothing on the host, so one captured CUDA graph replays every step. Prompts are unpadded
    (one length for the batch). ``cuda_graph=False`` runs the same static step eagerly (any device).

    ``compile=True`` compiles the step with ``torch.compile`` (whole graph, static shapes, ``mode``
    ``compile_mode``) before it is captured, so that elementwise work between GEMMs fuses into few
    kernels. The first step then pays the compilation (seconds to minutes).

    Steps read the weights as of the last :meth:`prefill` or :meth:`refresh_weights`: nothing is checked
    per token, where host time is what a CUDA-graph replay is there to save.
    """

    def __init__(self, model: DecoderLM, batch: int, capacity: int, cuda_graph: bool = True,
                 compile: bool = False, compile_mode: str | None = None) -> None:
        if cuda_graph and compile_mode in ("reduce-overhead", "max-autotune"):
            # those modes capture CUDA graphs of their own, which cannot nest inside ours
            raise ValueError(f"compile_mode={compile_mode!r} captures its own CUDA graphs; with cuda_graph=True use "
                             "None or 'max-autotune-no-cudagraphs'")
        device = model.embed.weight.device
        if cuda_graph and device.type != "cuda":
            raise ValueError("cuda_graph=True needs the model on a CUDA device")
        if compile_mode is not None and not compile:
            raise ValueError(f"compile_mode={compile_mode!r} needs compile=True")
        self.model, self.capacity, self.cuda_graph = model, capacity, cuda_graph
        self.cache = model.new_cache(capacity)
        self.key_positions = torch.arange(capacity, device=device).unsqueeze(0)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.graph: Any = None
        self.logits: Tensor | None = None
        self._sas_layers = sas_layers(model)
        # every weight is read once per token: keep the fused projections' concatenated weights rather than
        # concatenating them every step (the memory of those weights once more, freed with the decoder)
        self._fused_groups = fused_groups(model)
        weakref.finalize(self, drop_concats, model)
        # the unbound function, called with the decoder: a bound method stored on the decoder would be a
        # reference cycle, keeping the model and cache alive after the decoder is dropped until a gc pass
        self._step_fn = StaticDecoder._step
        if compile:
            self._step_fn = torch.compile(StaticDecoder._step, fullgraph=True, dynamic=False, mode=compile_mode)
        self.refresh_weights()

    @torch.no_grad()
    def prefill(self, input_ids: Tensor) -> Tensor:
        """Run the prompt (B, T) through the cache; returns the last position's logits (B, V).

        Each call starts a new generation: the cache is emptied first (its buffers, which a captured CUDA graph
        reads, are kept)."""
        if input_ids.shape[0] != self.token.shape[0]:
            raise ValueError(f"prompt batch {input_ids.shape[0]} != the decoder's batch {self.token.shape[0]}")
        if input_ids.shape[1] >= self.capacity:
            raise ValueError(f"prompt of {input_ids.shape[1]} tokens leaves no room in capacity {self.capacity}")
        for layer in self.cache.layers:
            layer.write_at(None)
        self.cache.crop(0)
        logits = self.model(input_ids, cache=self.cache)[:, -1]
        self.position.fill_(self.cache.seq_len)
        for layer in self.cache.layers:
            layer.write_at(self.position)
        self.refresh_weights()
        return logits

    @torch.no_grad()
    def refresh_weights(self) -> None:
        """Bring the step's weight-derived operands (SAS decode plans, kept concatenations of fused
        projections) up to date with the model's weights, in place where their shapes allow.

        :meth:`prefill` calls this, so every generation reads the weights as they are when it starts.
        Steps do not check (a Python pass over every parameter would cost more host time per token than a
        CUDA-graph replay): call it after changing weights between the steps of one generation."""
        reallocated = bool(self._sas_layers) and prepare_decode(self.model, self._sas_layers)
        if keep_concats(self._fused_groups) or reallocated:
            self.graph = None  # new storage: the captured graph read the old one

    def _step(self) -> Tensor:
        model = self.model
        mask = (self.key_positions <= self.position).view(1, 1, 1, self.capacity)
        rotary = model.rotary.tables(self.position.view(1, 1), self.capacity)
        ctx = AttentionContext(rotary, mask, None, self.key_positions)
        x = model.embed(self.token)
        for block, layer in zip(model.blocks, self.cache.layers):
            x = block(x, ctx.for_layer(layer))
        return model.lm_head(model.norm(x))[:, -1]

    def _capture(self) -> None:
        # warm up on a side stream (allocator, library handles), then capture one step; the warm-up
        # writes this step's slot with this step's token, exactly what the replay writes again
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step_fn(self)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step_fn(self)

    @torch.no_grad()
    def step(self, token_B1: Tensor) -> Tensor:
        """Feed one token per sequence (B, 1); returns the next-token logits (B, V).

        With a CUDA graph the returned tensor is the graph's output buffer: the next step overwrites it."""
        if self.cache.seq_len >= self.capacity:
            raise ValueError(f"KV cache capacity {self.capacity} exceeded; create the decoder with a larger capacity")
        self.token.copy_(token_B1)
        if self.cuda_graph:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            logits = self.logits
        else:
            logits = self._step_fn(self)
        self.position += 1
        for layer in self.cache.layers:
            layer.length += 1
        return logits
