"""Qwen3 / Qwen3-MoE configuration with Hugging Face `config.json` names and semantics."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# Keys without which a config.json cannot describe a model (the rest have HF's defaults).
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
)
_REQUIRED_MOE = ("num_experts", "num_experts_per_tok", "moe_intermediate_size")


@dataclasses.dataclass
class Qwen3Config:
    model_type: str = "qwen3_moe"  # "qwen3_moe" or "qwen3" (dense)
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144  # dense MLP width (dense model, or mlp_only_layers of a MoE model)
    moe_intermediate_size: int = 768
    num_hidden_layers: int = 48
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int | None = 128  # independent of hidden_size / num_attention_heads
    num_experts: int = 128
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = dataclasses.field(default_factory=list)
    rope_theta: float = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "yarn", "factor": .., ...} or None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 40960
    router_aux_loss_coef: float = 0.001
    hidden_act: str = "silu"
    attention_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    pad_token_id: int | None = None
    torch_dtype: str | None = "bfloat16"

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.mlp_only_layers = sorted(int(i) for i in (self.mlp_only_layers or []))
        if self.model_type not in ("qwen3_moe", "qwen3"):
            raise ValueError(f"Qwen3Config: model_type {self.model_type!r} is not 'qwen3_moe' or 'qwen3'")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"Qwen3Config: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.is_moe and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"Qwen3Config: num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts={self.num_experts}]"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"Qwen3Config: hidden_act {self.hidden_act!r} is not supported (Qwen3 uses 'silu')")
        if self.attention_bias:
            raise ValueError("Qwen3Config: attention_bias=True is not supported (no Qwen3 checkpoint uses it)")
        if self.rope_scaling is not None:
            rs = dict(self.rope_scaling)
            rtype = rs.get("rope_type", rs.get("type", "default"))
            if rtype not in ("default", "yarn"):
                raise ValueError(f"Qwen3Config: rope_scaling type {rtype!r} is not supported (default or yarn)")
            rs["rope_type"] = rtype
            rs.pop("type", None)
            rs.pop("rope_theta", None)
            self.rope_scaling = None if rtype == "default" else rs
        if self.rope_scaling is not None:
            if "original_max_position_embeddings" not in self.rope_scaling:
                self.rope_scaling["original_max_position_embeddings"] = self.max_position_embeddings
            if self.rope_scaling.get("factor") is None:
                self.rope_scaling["factor"] = (
                    self.max_position_embeddings / self.rope_scaling["original_max_position_embeddings"]
                )

    def __hash__(self):  # hashable so that modules holding a config can be jit static data
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str))

    # ---- derived layout -------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.model_type == "qwen3_moe" and self.num_experts > 0

    def is_moe_layer(self, i: int) -> bool:
        """HF rule: layer i is sparse unless listed in mlp_only_layers or off the sparse step."""
        return self.is_moe and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def dense_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if not self.is_moe_layer(i)]

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    # ---- Hugging Face interop -------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "Qwen3Config":
        d = dict(d)
        model_type = d.get("model_type", "qwen3_moe")
        if model_type not in ("qwen3_moe", "qwen3"):
            raise ValueError(f"{source}: model_type {model_type!r} is not a Qwen3 model ('qwen3_moe' or 'qwen3')")
        if "num_local_experts" in d and "num_experts" not in d:  # transformers 5 spelling
            d["num_experts"] = d.pop("num_local_experts")
        d.pop("num_local_experts", None)
        # rope: hub writes rope_theta + rope_scaling; transformers 5 writes rope_parameters.
        rp = d.pop("rope_parameters", None)
        if rp:
            rp = dict(rp)
            if "rope_theta" in rp:
                d.setdefault("rope_theta", rp.pop("rope_theta"))
            rtype = rp.get("rope_type", rp.get("type", "default"))
            if rtype != "default" and d.get("rope_scaling") is None:
                d["rope_scaling"] = rp
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d["dtype"]
        required = _REQUIRED + (_REQUIRED_MOE if model_type == "qwen3_moe" else ("intermediate_size",))
        for key in required:
            if key not in d:
                raise KeyError(f"{source}: required key {key!r} is missing")
        if model_type == "qwen3":
            d.setdefault("num_experts", 0)
            d.setdefault("num_experts_per_tok", 0)
            d.setdefault("norm_topk_prob", False)
        else:
            d.setdefault("norm_topk_prob", False)  # HF's default for qwen3_moe
        d.setdefault("num_key_value_heads", d["num_attention_heads"])
        d.setdefault("head_dim", None)
        d.setdefault("rope_theta", 10000.0)
        d.setdefault("bos_token_id", None)
        d.setdefault("eos_token_id", None)
        d.setdefault("max_position_embeddings", 32768)
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Qwen3Config":
        """`path` is a checkpoint directory (reads its config.json) or a .json file."""
        path = os.fspath(path)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise FileNotFoundError(f"{file}: no config.json")
        try:
            with open(file) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=file)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json a hub checkpoint of this model has (loadable by transformers 4 and 5)."""
        moe = self.model_type == "qwen3_moe"
        d: dict[str, Any] = {
            "architectures": ["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"],
            "model_type": self.model_type,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "hidden_size": self.hidden_size,
            "initializer_range": self.initializer_range,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.torch_dtype,
            "use_cache": True,
            "use_sliding_window": False,
            "sliding_window": None,
            "vocab_size": self.vocab_size,
        }
        if self.pad_token_id is not None:
            d["pad_token_id"] = self.pad_token_id
        if moe:
            d.update(
                decoder_sparse_step=self.decoder_sparse_step,
                mlp_only_layers=list(self.mlp_only_layers),
                moe_intermediate_size=self.moe_intermediate_size,
                norm_topk_prob=self.norm_topk_prob,
                num_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                output_router_logits=False,
                router_aux_loss_coef=self.router_aux_loss_coef,
            )
        return d

    def save_pretrained(self, path: str | os.PathLike) -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2)

    def replace(self, **kw) -> "Qwen3Config":
        return dataclasses.replace(self, **kw)

    # ---- presets --------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "Qwen3Config":
        """Published configs, e.g. Qwen3Config.preset("Qwen3-30B-A3B")."""
        key = name.split("/")[-1]
        if key not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[key], **overrides}, source=f"preset {key}")

    @staticmethod
    def presets() -> list[str]:
        return list(PRESETS)


_COMMON = dict(
    vocab_size=151936,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    max_position_embeddings=40960,
    bos_token_id=151643,
    eos_token_id=151645,
    torch_dtype="bfloat16",
)
_MOE = dict(
    _COMMON,
    model_type="qwen3_moe",
    decoder_sparse_step=1,
    mlp_only_layers=[],
    norm_topk_prob=True,
    num_experts=128,
    num_experts_per_tok=8,
    router_aux_loss_coef=0.001,
    tie_word_embeddings=False,
)


def _dense(hidden, inter, layers, heads, kv, tie):
    return dict(
        _COMMON,
        model_type="qwen3",
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        tie_word_embeddings=tie,
    )


PRESETS: dict[str, dict[str, Any]] = {
    "Qwen3-30B-A3B": dict(
        _MOE, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
    ),
    "Qwen3-30B-A3B-Instruct-2507": dict(
        _MOE, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
        rope_theta=10_000_000.0, max_position_embeddings=262144,
    ),
    "Qwen3-Coder-30B-A3B-Instruct": dict(
        _MOE, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
        rope_theta=10_000_000.0, max_position_embeddings=262144,
    ),
    "Qwen3-235B-A22B": dict(
        _MOE, hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4,
    ),
    "Qwen3-0.6B": _dense(1024, 3072, 28, 16, 8, True),
    "Qwen3-1.7B": _dense(2048, 6144, 28, 16, 8, True),
    "Qwen3-4B": _dense(2560, 9728, 36, 32, 8, True),
    "Qwen3-8B": _dense(4096, 12288, 36, 32, 8, False),
    "Qwen3-14B": _dense(5120, 17408, 40, 40, 8, False),
    "Qwen3-32B": _dense(5120, 25600, 64, 64, 8, False),
}
