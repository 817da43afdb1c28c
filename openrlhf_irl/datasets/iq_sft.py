"""OpenRLHF's SFT dataset, with responses cut by ``max_len`` kept distinguishable from responses that ended."""

from openrlhf.datasets import SFTDataset


class IQSFTDataset(SFTDataset):
    """``SFTDataset`` that does not pretend a truncated response ended.

    OpenRLHF overwrites the last token of every sample with EOS, so a response cut by ``max_len`` looks terminal.
    IQ-Learn treats the EOS step as the end of the episode (V = 0 after it), so for a cut response this dataset puts
    the real token back: its last step then has no TD term and its MLE target is the true token
    (``--irl.keep_truncation``, on by default; off gives OpenRLHF's behaviour).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        irl = getattr(self.strategy.args, "irl", None)
        self.keep_truncation = bool(getattr(irl, "keep_truncation", True))

    def __getitem__(self, idx):
        input_ids, attention_mask, loss_mask = super().__getitem__(idx)
        if self.keep_truncation and not self.pretrain_mode:
            full_ids = self.tokenizer(self._text(idx), add_special_tokens=False)["input_ids"]
            if len(full_ids) > self.max_length:
                input_ids[0][-1] = full_ids[self.max_length - 1]
        return input_ids, attention_mask, loss_mask

    def _text(self, idx) -> str:
        # The string SFTDataset tokenizes: prompt + response, then " " + EOS unless it already ends with it.
        text = (self.prompts[idx] + self.responses[idx]).rstrip("\n")
        eos = self.tokenizer.eos_token
        return text if text.endswith(eos) else text + " " + eos
