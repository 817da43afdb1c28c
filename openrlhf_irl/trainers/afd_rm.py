"""AfD classifier reward model (``--trainer afd_rm``): binary cross-entropy on unpaired labelled samples.

AfD (Sun & van der Schaar 2024) trains a discriminator D(x, y) between a positive source (demonstrations or
SFT-policy samples, label 1) and a negative one (label 0); the reward is its logit,
``r = log D - log(1 - D)``. With OpenRLHF's reward model (scalar value head read at the EOS token) as the
classifier's logit, the loss per micro-batch is

    L = -mean_i [ y_i log sigmoid(r_i) + (1 - y_i) log(1 - sigmoid(r_i)) ]

(computed in fp32; ``--model.loss_type`` names pairwise losses and does not apply).

OpenRLHF 0.11.2's ``RewardModelTrainer.fit``/``evaluate`` unpack chosen/rejected pairs inline. With
``patches/0003`` (``RewardModelTrainer.training_step``) OpenRLHF's own ``fit`` runs and calls this trainer's
:meth:`training_step`; on a stock 0.11.2 this trainer re-states the loop of ``fit``. ``evaluate`` is this
trainer's own (classifier metrics) over ``(input_ids, attention_mask, labels)`` batches from
:class:`~openrlhf_irl.datasets.labeled_reward.LabeledRewardDataset`, with OpenRLHF's own calls and semantics:
``strategy.backward`` / ``optimizer_step`` / ``all_reduce`` / ``all_gather``, the accumulation-step logging and
:meth:`save_logs_and_checkpoints` (evaluation, DeepSpeed and HF checkpoints), and ``evaluate`` storing the
mean/std of the eval rewards in the model config, which ``train_rm`` saves with the value head. Everything
else (constructor, wandb/TensorBoard setup, checkpointing) is the parent's.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from openrlhf.trainer.rm_trainer import RewardModelTrainer
from openrlhf.utils.distributed_sampler import DistributedSampler
from tqdm import tqdm

from openrlhf_irl.utils.checkpoint import write_then_retire

__all__ = ["BCERewardLoss", "AfDRewardTrainer", "classifier_stats"]


class BCERewardLoss(nn.Module):
    """Binary cross-entropy with logits on scalar rewards, averaged over samples, in fp32."""

    def forward(self, rewards: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rewards = rewards.float()
        return F.binary_cross_entropy_with_logits(rewards, labels.to(device=rewards.device, dtype=rewards.dtype))


def classifier_stats(rewards: torch.Tensor, labels: torch.Tensor) -> dict:
    """Sums and counts behind accuracy (sign(r) vs label) and the mean reward of positives and negatives."""
    rewards, positive = rewards.detach().float(), labels.to(rewards.device) > 0.5
    return {
        "correct": ((rewards > 0) == positive).sum().item(),
        "count": rewards.numel(),
        "pos_sum": rewards[positive].sum().item(),
        "pos_count": positive.sum().item(),
        "neg_sum": rewards[~positive].sum().item(),
        "neg_count": (~positive).sum().item(),
    }


def classifier_logs(stats: dict) -> dict:
    """``acc``, ``pos_reward`` and ``neg_reward`` from (all-reduced) :func:`classifier_stats`; a class absent
    from the batch gets no mean."""
    logs = {"acc": stats["correct"] / max(stats["count"], 1)}
    for side in ("pos", "neg"):
        if stats[f"{side}_count"] > 0:
            logs[f"{side}_reward"] = stats[f"{side}_sum"] / stats[f"{side}_count"]
    return logs


class AfDRewardTrainer(RewardModelTrainer):
    """OpenRLHF ``RewardModelTrainer`` (same constructor) whose objective is AfD's BCE; see the module docstring."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.margin_loss:
            raise ValueError("--model.margin_loss_enable applies to chosen/rejected pairs; --trainer afd_rm "
                             "trains a classifier on labelled samples and has no margin.")
        self.loss_fn = BCERewardLoss()
        write_then_retire(self.strategy)  # --ckpt.max_num rotation never deletes the only complete checkpoint
        self.strategy.print("AfD binary cross-entropy loss (reward = classifier logit)")

    # ---- one forward ----------------------------------------------------------------------------------------
    def reward_forward(self, data, device):
        """``(rewards [B], labels [B], aux_loss)`` for a collated ``(input_ids, attention_mask, labels)``."""
        input_ids, attention_mask, labels = data
        input_ids = input_ids.squeeze(1).to(device)
        attention_mask = attention_mask.squeeze(1).to(device)
        rewards, output = self.model(
            input_ids, attention_mask=attention_mask, return_output=True, ring_attn_group=self.strategy.ring_attn_group
        )
        aux_loss = output.aux_loss if "aux_loss" in output else []
        return rewards, labels.to(device), aux_loss

    def training_step(self, data, device) -> dict:
        """Forward, BCE loss, backward and optimizer step on one micro-batch; returns its (all-reduced) logs."""
        rewards, labels, aux_loss = self.reward_forward(data, device)
        bce_loss = self.loss_fn(rewards, labels)
        if not self.aux_loss:
            aux_loss = 0
        loss = bce_loss + aux_loss * self.args.model.aux_loss_coef
        self.strategy.backward(loss, self.model, self.optimizer)
        self.strategy.optimizer_step(self.optimizer, self.model, self.scheduler)

        logs_dict = {
            "loss": bce_loss.item(),
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": self.strategy.get_grad_norm(self.model),
        }
        if self.aux_loss:
            logs_dict["aux_loss"] = aux_loss.item()
        logs_dict = self.strategy.all_reduce(logs_dict)
        # sums and counts reduced over ranks, so a rank without positives (or negatives) does not bias the means
        logs_dict.update(classifier_logs(self.strategy.all_reduce(classifier_stats(rewards, labels), op="sum")))
        return logs_dict

    # ---- the loop of RewardModelTrainer.fit, over labelled batches ------------------------------------------
    def fit(self, args, consumed_samples=0, num_update_steps_per_epoch=None):
        if "training_step" in vars(RewardModelTrainer):  # OpenRLHF with patches/0003: its loop calls ours
            self.strategy.print("AfD: OpenRLHF's RewardModelTrainer.fit drives training_step")
            return super().fit(args, consumed_samples, num_update_steps_per_epoch)
        # stock OpenRLHF 0.11.2: the same loop as its fit, with the step in training_step
        if num_update_steps_per_epoch is None:
            num_update_steps_per_epoch = len(self.train_dataloader)
        if num_update_steps_per_epoch <= 0:
            raise ValueError(
                f"num_update_steps_per_epoch must be positive, got {num_update_steps_per_epoch}. "
                "Check that your dataset is not smaller than train_batch_size."
            )
        if args.eval.steps == -1:
            args.eval.steps = num_update_steps_per_epoch  # evaluate once per epoch
        if args.ckpt.save_steps == -1:
            args.ckpt.save_steps = float("inf")  # do not save ckpt
        self.num_update_steps_per_epoch = num_update_steps_per_epoch

        # restore step and start_epoch
        step = consumed_samples // args.train.batch_size * self.strategy.accumulated_gradient + 1
        start_epoch = consumed_samples // args.train.batch_size // num_update_steps_per_epoch
        consumed_samples = consumed_samples % (num_update_steps_per_epoch * args.train.batch_size)

        epoch_bar = tqdm(range(start_epoch, self.epochs), desc="Train epoch", disable=not self.strategy.is_rank_0())
        acc_sum = 0
        loss_sum = 0
        for epoch in range(start_epoch, self.epochs):
            if isinstance(self.train_dataloader.sampler, DistributedSampler):
                self.train_dataloader.sampler.set_epoch(
                    epoch, consumed_samples=0 if epoch > start_epoch else consumed_samples
                )
            step_bar = tqdm(
                range(len(self.train_dataloader)),
                desc="Train step of epoch %d" % epoch,
                disable=not self.strategy.is_rank_0(),
            )

            self.model.train()
            device = next(self.model.parameters()).device
            for data in self.train_dataloader:
                logs_dict = self.training_step(data, device)
                acc_sum += logs_dict["acc"]
                loss_sum += logs_dict["loss"]
                step_bar.set_postfix(logs_dict)
                step_bar.update()

                # logs/checkpoints/evaluation
                if step % self.strategy.accumulated_gradient == 0:
                    logs_dict["loss_mean"] = loss_sum / self.strategy.accumulated_gradient
                    logs_dict["acc_mean"] = acc_sum / self.strategy.accumulated_gradient
                    loss_sum = 0
                    acc_sum = 0
                    global_step = step // self.strategy.accumulated_gradient
                    client_states = {"consumed_samples": global_step * args.train.batch_size}
                    self.save_logs_and_checkpoints(args, global_step, step_bar, logs_dict, client_states)

                step += 1
            epoch_bar.update()

        if self._wandb is not None and self.strategy.is_rank_0():
            self._wandb.finish()
        if self._tensorboard is not None and self.strategy.is_rank_0():
            self._tensorboard.close()

    # ---- RewardModelTrainer.evaluate, over labelled batches --------------------------------------------------
    def evaluate(self, eval_dataloader, steps=0):
        """BCE loss, accuracy and class means on the eval set; stores the reward mean/std in the model config
        (``config.mean`` / ``config.std``, saved with the model) as OpenRLHF's evaluate does."""
        step_bar = tqdm(
            range(len(eval_dataloader)),
            desc="Eval stage of steps %d" % steps,
            disable=not self.strategy.is_rank_0(),
        )
        self.model.eval()
        with torch.no_grad():
            rewards, labels = [], []
            device = next(self.model.parameters()).device
            for data in eval_dataloader:
                reward, label, _ = self.reward_forward(data, device)
                rewards.append(reward.flatten().float())
                labels.append(label.flatten().float())
                step_bar.update()

            rewards = self.strategy.all_gather(torch.cat(rewards))
            labels = self.strategy.all_gather(torch.cat(labels))
            reward_mean = torch.mean(rewards)
            reward_std = torch.std(rewards).clamp(min=1e-8)

            # save mean std
            self.strategy.print("Set reward mean std")
            unwrap_model = self.strategy._unwrap_model(self.model)
            unwrap_model.config.mean = reward_mean.item()
            unwrap_model.config.std = reward_std.item()

            stats = classifier_logs(classifier_stats(rewards, labels))
            logs = {
                "eval_loss": self.loss_fn(rewards, labels).item(),
                "acc_mean": stats.pop("acc"),
                "reward_mean": reward_mean.item(),
                "reward_std": reward_std.item(),
                **stats,
            }
            step_bar.set_postfix(logs)

            histogram = torch.histogram(rewards.cpu(), bins=10, range=(-10, 10), density=True)
            self.strategy.print("histogram")
            self.strategy.print(histogram)

            if self.strategy.is_rank_0():
                if self._wandb is not None:
                    self._wandb.log({"eval/%s" % k: v for k, v in {**logs, "global_step": steps}.items()})
                elif self._tensorboard is not None:
                    for k, v in logs.items():
                        self._tensorboard.add_scalar(f"eval/{k}", v, steps)
        self.model.train()  # reset model state
        return logs
