"""IQ-Learn SFT trainer (``--trainer irl_iq``): OpenRLHF's ``SFTTrainer`` with IQ-Learn's loss.

The loss (offline and online, plain and fused) is :class:`openrlhf_irl.losses.iq_sft.IQLearnSFTLoss`; this trainer
supplies what a trainer owns: the model's forward as a :class:`PolicyForward`, the ``td_weight`` warm-up schedule over
optimizer steps, the policy samples of the online variant (``--irl.sampler``, refreshed every
``--irl.online_refresh_steps``), logging and checkpoints.

OpenRLHF 0.11.2's ``SFTTrainer.fit`` computes its loss inline as ``self.loss_fn(self.model(...), mask, **norms)``.
This trainer keeps that loop untouched and changes the two pieces it calls: the model's forward returns a
:class:`PolicyForward` and ``loss_fn`` is :meth:`IQLearnTrainer.scheduled_loss`, which calls the loss with this
step's ``td_weight`` and policy batch.
"""

from __future__ import annotations

import torch
from openrlhf.trainer.sft_trainer import SFTTrainer

from openrlhf_irl.losses.fused_head import FusedHead, UnsupportedHead
from openrlhf_irl.losses.iq_sft import IQConfig, IQLearnSFTLoss, PolicyForward, check_online_config


def checked_fused_head(model, hidden_last: torch.Tensor, logits_last: torch.Tensor) -> FusedHead:
    """``model``'s fused head, checked once against its own last-position logits. A head the fused loss cannot
    reproduce is refused in one ValueError that names the flag (the loss layer's :class:`UnsupportedHead` does not)."""
    try:
        head = FusedHead.of(model)
        head.check(hidden_last, logits_last)
    except UnsupportedHead as err:
        raise ValueError(f"--irl.fused_loss: {err}; train without --irl.fused_loss (the plain loss uses the model's "
                         "own logits)") from None
    return head


class IQLearnTrainer(SFTTrainer):
    """OpenRLHF ``SFTTrainer`` whose per-token loss is IQ-Learn's; see the module docstring."""

    def __init__(self, model, strategy, *args, **kwargs):
        super().__init__(model, strategy, *args, **kwargs)
        from openrlhf_irl.utils.checkpoint import write_then_retire

        write_then_retire(self.strategy)  # --ckpt.max_num rotation never deletes the only complete checkpoint
        self.iq_config = IQConfig.from_args(self.args)
        if self.packing_samples:
            raise ValueError(
                "--trainer irl_iq does not support --ds.packing_samples: the TD term needs V(s_{t+1}) of the same "
                "sequence, which packed rows would mix across samples. Train without packing."
            )
        if self.pretrain_mode:
            raise ValueError("--trainer irl_iq needs prompt/response data; --model.pretrain_mode_enable is MLE only.")
        if self.tokenizer is None or self.tokenizer.eos_token_id is None:
            raise ValueError("--trainer irl_iq needs a tokenizer with an EOS token to find terminal steps.")
        check_online_config(self.iq_config, multiturn=bool(getattr(getattr(self.args, "data", None), "multiturn", False)))
        self.eos_token_id = self.tokenizer.eos_token_id
        self.iq_loss = IQLearnSFTLoss(self.iq_config, self.eos_token_id, printer=self.strategy.print)
        self.loss_fn = self.scheduled_loss
        self._actor_forward = model.forward
        # SFTTrainer.fit/evaluate call self.model(...) and hand the result to self.loss_fn.
        model.forward = self.policy_forward
        self._online_samples = None
        self._online_refreshed_at = None
        self.policy_sampler = None
        if self.iq_config.online_mix > 0:
            from openrlhf_irl.generation.online import build_policy_sampler

            self.policy_sampler = build_policy_sampler(self.args, self.tokenizer)

    # ---- model side -------------------------------------------------------------------------------------------
    @property
    def optimizer_steps(self) -> int:
        return int(getattr(self.model.model, "global_steps", 0))

    def _hf_model(self):
        engine = self.model.model
        return getattr(engine, "module", engine)

    def policy_forward(self, sequences, attention_mask=None, return_output=False, return_logprobs=False,
                       ring_attn_group=None, **kwargs):
        """Replaces ``Actor.forward`` for this trainer: returns ``PolicyForward`` (and the HF output)."""
        labels = sequences[:, 1:]
        if self.iq_config.fused_loss:
            position_ids = attention_mask.long().cumsum(-1) - 1
            position_ids.masked_fill_(attention_mask == 0, 1)
            output = self.model.model(
                sequences, attention_mask=attention_mask, position_ids=position_ids,
                output_hidden_states=True, logits_to_keep=1,
            )
            head = checked_fused_head(self._hf_model(), output.hidden_states[-1][:, -1], output.logits[:, -1])
            fwd = PolicyForward(sequences, labels, hidden=output.hidden_states[-1][:, :-1], head=head,
                                chunk_size=self.iq_config.fused_chunk_size, attention_mask=attention_mask,
                                hidden_full=output.hidden_states[-1], single_pass=self.iq_config.fused_single_pass)
        else:
            output = self._actor_forward(sequences, attention_mask=attention_mask, return_output=True,
                                         ring_attn_group=ring_attn_group)
            fwd = PolicyForward(sequences, labels, logits=output["logits"], attention_mask=attention_mask)
        return (fwd, output) if return_output else fwd

    # ---- the loss, with what the trainer owns: the schedule and the policy samples ---------------------------------
    def scheduled_loss(self, fwd, loss_mask, dp_size=1, batch_num_tokens=None, global_batch_size=None):
        """``loss_fn`` as ``SFTTrainer.fit`` calls it: :attr:`iq_loss` with this optimizer step's ``td_weight``
        (warm-up while training, the full weight in evaluation) and, online while training, the policy samples of
        this micro-batch's prompts, teacher-forced."""
        cfg, step, training = self.iq_config, self.optimizer_steps, self.model.training
        policy = None
        if training and cfg.online_mix > 0:
            samples = self._policy_samples(fwd.sequences, loss_mask.bool())
            policy = (self.policy_forward(samples["sequences"], attention_mask=samples["attention_mask"]),
                      samples["loss_mask"].bool())
        return self.iq_loss(fwd, loss_mask, dp_size, batch_num_tokens, global_batch_size,
                            td_weight=cfg.td_weight_at(step) if training else cfg.td_weight, policy=policy,
                            where=f"optimizer step {step}" + ("" if training else " (evaluation)"))

    def _policy_samples(self, sequences, loss_mask):
        """Samples from the prompts of the current micro-batch.

        Every ``online_refresh_steps`` optimizer steps the sampler (``--irl.sampler``) gets the current weights and
        each micro-batch of that step draws from its own prompts; the steps in between reuse the samples drawn for
        the micro-batch at the same position of the window. Every rank makes the same calls (collective).
        """
        cfg = self.iq_config
        step = self.optimizer_steps
        if step != getattr(self, "_window_step", None):
            self._window_step, self._micro_batch = step, 0
        else:
            self._micro_batch += 1
        if self._online_refreshed_at is None or step - self._online_refreshed_at >= cfg.online_refresh_steps:
            self.policy_sampler.refresh(self.model.model, zero_stage=self.strategy.stage)
            self._online_refreshed_at = step
            self._online_samples = {}
        cache = self._online_samples
        if step == self._online_refreshed_at or self._micro_batch not in cache:
            cache[self._micro_batch] = self.policy_sampler.sample(prompt_rows(sequences, loss_mask))
        return cache[self._micro_batch]

    # ---- logging hooks of SFTTrainer.fit ---------------------------------------------------------------------------
    def save_logs_and_checkpoints(self, args, global_step, step_bar, logs_dict=None, client_states=None):
        logs_dict = dict(logs_dict or {})
        iq_logs = self.strategy.all_reduce(self.iq_loss.pop_stats())
        logs_dict.update({f"iq_{k}": v for k, v in iq_logs.items()})
        if self.strategy.is_rank_0() and iq_logs:
            step_bar.set_postfix({k: round(v, 4) for k, v in logs_dict.items() if k.startswith("iq_")})
        return super().save_logs_and_checkpoints(args, global_step, step_bar, logs_dict, client_states)

    def evaluate(self, eval_dataloader, steps=0):
        self.iq_loss.pop_stats()  # drop unlogged training stats of a partial window
        super().evaluate(eval_dataloader, steps)
        logs = self.strategy.all_reduce(self.iq_loss.pop_stats())
        self.last_eval_stats = logs
        self.strategy.print(f"[irl_iq eval @ step {steps}] " + ", ".join(f"{k}={v:.4f}" for k, v in logs.items()))
        if self.strategy.is_rank_0():
            if self._wandb is not None:
                self._wandb.log({**{f"eval/iq_{k}": v for k, v in logs.items()}, "eval/global_step": steps})
            elif self._tensorboard is not None:
                for k, v in logs.items():
                    self._tensorboard.add_scalar(f"eval/iq_{k}", v, steps)
        return logs



def prompt_rows(sequences: torch.Tensor, loss_mask: torch.Tensor) -> list[torch.Tensor]:
    """Prompt tokens of each SFT row: everything up to the state that emits the first response token."""
    rows = []
    for seq, mask in zip(sequences, loss_mask.bool()):
        idx = mask.nonzero()
        if len(idx):
            rows.append(seq[: int(idx[0]) + 1])
    return rows
