"""Build this rank's part of a megatron-core GPTModel from a recipe and its config.json.

Layer specs: transformer-engine's when it imports on a GPU (MOE_TRANSFORMER_ENGINE=0 turns it
off); otherwise megatron-core's local spec with torch's attention kernels as the core
attention (trainer.model.attention). Both write the same checkpoint keys: the TE-free layers
file their norms under the names of the transformer-engine layers that fuse them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from launcher.errors import UserError
from trainer.model import fused, output_loss
from trainer.model.hf_config import ModelArgs, model_args


def have_transformer_engine() -> bool:
    if os.environ.get("MOE_TRANSFORMER_ENGINE", "1") == "0":
        return False
    try:
        import transformer_engine  # noqa: F401
        return torch.cuda.is_available()
    except ImportError:
        return False


def read_model_args(model_path: str) -> ModelArgs:
    path = Path(model_path) / "config.json"
    return model_args(json.loads(path.read_text()), str(path))


def transformer_config(args: ModelArgs, recipe, dtype: torch.dtype):
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    meg = recipe.megatron
    moe = recipe.model.override_config.moe_config
    fields = dict(args.transformer)
    fields.pop("rotary_base", None) if not args.mla else None
    fields.update(
        tensor_model_parallel_size=meg.tensor_model_parallel_size,
        pipeline_model_parallel_size=meg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=meg.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=meg.expert_model_parallel_size,
        expert_tensor_parallel_size=meg.expert_tensor_parallel_size,
        context_parallel_size=meg.context_parallel_size,
        sequence_parallel=meg.sequence_parallel,
        num_layers_in_first_pipeline_stage=meg.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=meg.num_layers_in_last_pipeline_stage,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
        hidden_dropout=0.0, attention_dropout=0.0,
        # SwiGLU: config.json's hidden_act, the only one hf_config accepts (megatron-core's default is GELU)
        activation_func=torch.nn.functional.silu,
        # Sum the loss over response tokens; megatron-core divides the gradients by the
        # number of such tokens across all micro-batches and data-parallel ranks.
        calculate_per_token_loss=True,
        use_cpu_initialization=not torch.cuda.is_available(),
        # trainer.model.fused: weight gradients straight into the main-gradient buffer, on GPUs
        gradient_accumulation_fusion=fused.enabled("grad_accum"),
        bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
        cross_entropy_loss_fusion=False,
        moe_token_dispatcher_type=moe.token_dispatcher,
        moe_z_loss_coeff=moe.z_loss_coeff,
        moe_expert_capacity_factor=moe.capacity_factor,
        moe_pad_expert_input_to_capacity=moe.pad_to_capacity,
        moe_router_force_load_balancing=moe.force_load_balancing,
        overlap_moe_expert_parallel_comm=meg.overlap_moe_expert_parallel_comm,
        # On a GPU: megatron-core's GroupedMLP over torch._grouped_mm (trainer.model.experts),
        # with or without transformer-engine, and the trainer's sync-free token permutation
        # (trainer.model.dispatch). transformer-engine's grouped experts (one GEMM per expert
        # on side streams, tokens per expert read on the host) and fused permutation ran the
        # 128-expert benchmark slice at half the speed (bench/README.md). On the CPU,
        # SequentialMLP (GroupedMLP needs bf16).
        moe_grouped_gemm=torch.cuda.is_available() and dtype == torch.bfloat16,
        moe_use_legacy_grouped_gemm=True,
    )
    if have_transformer_engine():  # megatron-core's fusions that run through transformer-engine
        fields.update(apply_rope_fusion=fused.enabled("rope"), bias_activation_fusion=fused.enabled("swiglu"),
                      cross_entropy_loss_fusion=fused.enabled("cross_entropy"), cross_entropy_fusion_impl="te",
                      moe_router_fusion=fused.enabled("router"))
    if moe.aux_loss_coeff is not None:
        fields["moe_aux_loss_coeff"] = moe.aux_loss_coeff
    if moe.capacity_factor is not None:
        fields["moe_token_drop_policy"] = "probs"
    if moe.freeze_moe_router and fields.get("moe_router_enable_expert_bias"):
        fields["moe_router_bias_update_rate"] = 0.0  # the aux-loss-free bias stays as loaded
    if recipe.model.enable_gradient_checkpointing:
        fields.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if meg.overlap_moe_expert_parallel_comm and not torch.cuda.is_available():
        raise UserError("megatron.overlap_moe_expert_parallel_comm=true: megatron-core's combined schedule runs "
                        "on CUDA streams and this machine has no GPU; set it false")
    if recipe.model.enable_mtp:
        if not args.mtp_layers:
            raise ValueError(f"model.enable_mtp: {recipe.model.path}/config.json has no multi-token-prediction "
                             "layers (num_nextn_predict_layers)")
        fields.update(mtp_num_layers=args.mtp_layers, mtp_loss_scaling_factor=recipe.model.mtp_loss_scale)
    cls = MLATransformerConfig if args.mla else TransformerConfig
    return cls(**fields)


def layer_spec(config, vp_stage=None):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    use_te = have_transformer_engine()
    if config.moe_grouped_gemm:
        from trainer.model import experts

        experts.install()
    if use_te:
        from trainer.model import thd

        thd.install()
    fused.install()
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization="RMSNorm",
                                      vp_stage=vp_stage)
    if use_te and config.context_parallel_size == 1 and not config.multi_latent_attention \
            and fused.enabled("flex_attention"):
        from trainer.model.attention import te_attention_for_short_samples

        for layer in spec.layer_specs:
            layer.submodules.self_attention.submodules.core_attention = te_attention_for_short_samples()
    if not use_te:
        from megatron.core.transformer.spec_utils import ModuleSpec

        from trainer.model.attention import SDPAttention
        from trainer.model.norm import RMSNorm

        norm = ModuleSpec(module=RMSNorm)
        spec.layer_norm = norm
        _use_te_free_layers(spec.layer_specs, norm, SDPAttention, config.multi_latent_attention)
    return spec


def _use_te_free_layers(layer_specs, norm, attention_cls, mla: bool) -> None:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    for layer in layer_specs:
        sub = layer.submodules
        sub.input_layernorm = sub.pre_mlp_layernorm = norm
        attention = sub.self_attention.submodules
        attention.core_attention = attention_cls
        for name in ("q_layernorm", "k_layernorm", "kv_layernorm"):
            if getattr(attention, name, None) not in (None,) and _is_norm(getattr(attention, name)):
                setattr(attention, name, norm)
        sub.sharded_state_dict_keys_map = te_names(mla, moe=getattr(sub.mlp, "module", None) is MoELayer)


def te_names(mla: bool, moe: bool) -> dict[str, str]:
    """Checkpoint names of a TE-free layer's norms: where transformer-engine's layer spec fuses
    a norm into the linear layer after it (megatron-core 0.16's get_gpt_layer_with_transformer_engine_spec),
    the norm is filed as that layer's `layer_norm_weight`. The input norm goes into the fused
    QKV projection (MLA keeps its own); MLA's query and key/value norms into their up-projections;
    the pre-MLP norm into a dense MLP's first layer (an MoE layer keeps its own)."""
    names = {}
    if mla:
        names["self_attention.q_layernorm."] = "self_attention.linear_q_up_proj.layer_norm_"
        names["self_attention.kv_layernorm."] = "self_attention.linear_kv_up_proj.layer_norm_"
    else:
        names["input_layernorm."] = "self_attention.linear_qkv.layer_norm_"
    if not moe:
        names["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
    return names


def mtp_spec(config, decoder_spec, vp_stage=None):
    """The multi-token-prediction block, built like the decoder's last layer (TE-free where the
    decoder is)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    if not config.mtp_num_layers:
        return None
    use_te = have_transformer_engine()
    spec = get_gpt_mtp_block_spec(config, decoder_spec, use_transformer_engine=use_te, vp_stage=vp_stage)
    if spec is not None and not use_te:
        from megatron.core.transformer.spec_utils import ModuleSpec

        from trainer.model.norm import RMSNorm

        norm = ModuleSpec(module=RMSNorm)
        for layer in spec.layer_specs:  # each MTP layer: its norms, and a decoder layer inside
            for name in ("enorm", "hnorm", "layer_norm"):
                if hasattr(layer.submodules, name):
                    setattr(layer.submodules, name, norm)
    return spec


def _is_norm(spec) -> bool:
    from megatron.core.transformer.identity_op import IdentityOp

    module = getattr(spec, "module", spec)
    return module is not IdentityOp


def build_model(recipe, dtype: torch.dtype, pre_process: bool, post_process: bool, vp_stage=None):
    from megatron.core.models.gpt import GPTModel

    args = read_model_args(recipe.model.path)
    config = transformer_config(args, recipe, dtype)
    decoder_spec = layer_spec(config, vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=decoder_spec,
        mtp_block_spec=mtp_spec(config, decoder_spec, vp_stage),
        vocab_size=args.vocab_size,
        max_sequence_length=max(args.max_position_embeddings, recipe.data.max_length),
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=args.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(args.rotary_base),
        vp_stage=vp_stage,
    )
    output_loss.install(model)
    if recipe.model.override_config.moe_config.freeze_moe_router:
        for name, param in model.named_parameters():
            if ".router." in name:
                param.requires_grad_(False)
    return model
