"""OpenRLHF's SFT dataset with the episode boundaries IQ-Learn needs: cut responses stay non-terminal, and a
multi-turn conversation ends with an action."""

import json

from openrlhf.datasets import SFTDataset


class IQSFTDataset(SFTDataset):
    """``SFTDataset`` (same template, same joint tokenisation, same loss mask) with two changes.

    * Truncation: OpenRLHF overwrites the last token of every sample with EOS, so a response cut by ``max_len``
      looks terminal (V = 0 after it). With ``--irl.truncation bootstrap`` (default) or ``drop`` the real token is
      put back: the row then ends without EOS and the trainer bootstraps or drops its last TD term. ``eos`` keeps
      OpenRLHF's forced EOS.
    * Multi-turn (``--data.multiturn``): OpenRLHF's mask covers each assistant segment but not the text after the
      last one (the template's end of turn and the appended EOS). Here the mask is extended over that tail, so the
      conversation's last step emits EOS and is terminal, as in single-turn data (whose mask covers the EOS too).
      Records must end with an assistant message (checked at parse time).

    The number of records OpenRLHF drops (prompt of max_len - 2 tokens or more, empty response) is printed.
    """

    def __init__(self, dataset, tokenizer, max_length, strategy, *args, **kwargs):
        irl = getattr(strategy.args, "irl", None)
        self.truncation = getattr(irl, "truncation", "bootstrap")
        n_in = len(dataset)
        super().__init__(dataset, tokenizer, max_length, strategy, *args, **kwargs)
        dropped = n_in - len(self.prompts)
        if dropped:
            strategy.print(f"[irl_iq] {dropped} of {n_in} records dropped by OpenRLHF's SFT dataset: prompt of "
                           f"{max_length - 2} tokens or more (--data.max_len {max_length}) or empty response")

    def process_data(self, data):
        if self.multiturn and not self.pretrain_mode:
            self._check_turn_boundaries(data)
        return super().process_data(data)

    def _check_turn_boundaries(self, data) -> None:
        """OpenRLHF marks each assistant turn by tokenising conversation prefixes on their own. That is only right
        when each prefix's tokens are a prefix of the whole conversation's tokens; otherwise (a generation prompt
        ending in a space, say) a turn's mask is shifted onto a user token. Refuse such data."""
        messages = list(data[self.input_key])
        if self.output_key and data.get(self.output_key):
            messages.append(data[self.output_key])
        text = self.apply_chat_template(messages, tokenize=False).rstrip("\n")
        full = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        turn = 0
        for idx, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            turn += 1
            prefixes = [self.apply_chat_template(messages[:idx], tokenize=False, add_generation_prompt=True)]
            if idx + 1 < len(messages):
                prefixes.append(self.apply_chat_template(messages[: idx + 1], tokenize=False))
            for prefix in prefixes:
                ids = self.tokenizer(prefix, add_special_tokens=False)["input_ids"]
                if full[: len(ids)] != ids:
                    raise ValueError(
                        f"--data.multiturn: assistant turn {turn} of the conversation starting "
                        f"{json.dumps(messages[0].get('content', ''))[:60]} does not begin or end on a token "
                        "boundary of the whole conversation, so OpenRLHF's turn mask would cover the wrong tokens "
                        "(e.g. a user token as an assistant action); use a chat template whose turns start and "
                        "end on a boundary (a newline or a special token)")

    def __getitem__(self, idx):
        input_ids, attention_mask, loss_mask = super().__getitem__(idx)
        if self.pretrain_mode:
            return input_ids, attention_mask, loss_mask
        truncated = False
        if input_ids.shape[1] >= self.max_length:
            full_ids = self.tokenizer(self._text(idx), add_special_tokens=False)["input_ids"]
            truncated = len(full_ids) > self.max_length
            if truncated and self.truncation != "eos":
                input_ids[0][-1] = full_ids[self.max_length - 1]
        if self.multiturn and not truncated:
            marked = loss_mask[0].nonzero()
            if len(marked):
                loss_mask[0, int(marked[-1]) + 1 : -1] = 1
        return input_ids, attention_mask, loss_mask

    def _text(self, idx) -> str:
        # The string SFTDataset tokenizes: prompt + response, then " " + EOS unless it already ends with it.
        text = (self.prompts[idx] + self.responses[idx]).rstrip("\n")
        eos = self.tokenizer.eos_token
        return text if text.endswith(eos) else text + " " + eos
