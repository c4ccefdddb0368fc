"""The small defects of issue 18, section 8, each with its test.

- PPD drops users with fewer than 2 base-image pairs with a counted skip instead of raising mid-run.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


# ----------------------------------------------------------------------------- PPD: users with < 2 pairs
def _bank():
    """Users 0 (3 pairs), 1 (1 pair), 2 (1 base pair + 1 on-policy pair, which is never context)."""
    from diffpref.personalize.context import ContextBank

    gen = torch.Generator().manual_seed(0)
    n, e = 6, 8
    return ContextBank(text=torch.randn(n, e, generator=gen), image_0=torch.randn(n, e, generator=gen),
                       image_1=torch.randn(n, e, generator=gen), label=torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0]),
                       user_index=torch.tensor([0, 0, 0, 1, 2, 2]),
                       context_ok=torch.tensor([True, True, True, True, True, False]))


def test_users_without_context_are_counted_not_fatal():
    bank = _bank()
    # user 1's pair and user 2's base pair have no other pair as context; user 2's on-policy pair does (row 4)
    assert (bank.dropped_users, bank.dropped_pairs) == (2, 2)
    assert bank.has_context(torch.arange(6)).tolist() == [True, True, True, False, False, True]
    assert bank.skip_message.startswith("PPD: dropped 2 of 3 users with fewer than 2 base-image pairs (2 of 6 pairs)")
    rows = torch.arange(6)
    gens = [torch.Generator().manual_seed(i) for i in range(6)]
    features, mask = bank.sample_context(rows, gens, 1, 4)  # used to raise ValueError at row 3
    assert mask.any(1).all(), "every row needs one example slot for the encoder to run"
    assert mask[3:5].sum().item() == 2 and features[3:5].abs().sum() == 0  # one zero placeholder each
    assert mask[:3].sum(1).le(2).all()  # user 0's rows: at most their 2 other pairs
    assert torch.equal(features[5, 0], bank.features(torch.tensor([4]))[0])  # the on-policy pair reads row 4


def test_report_skips_says_it_once(caplog):
    from diffpref.personalize.context import report_skips

    lines: list[str] = []
    report_skips(_bank(), lines.append)
    assert len(lines) == 1 and "dropped 2 of 3 users" in lines[0]
    with caplog.at_level("WARNING"):
        report_skips(_bank())
    assert "dropped 2 of 3 users" in caplog.text


def test_conditioner_trains_dropped_users_without_a_user():
    """The conditioner zeroes the user tokens of rows without context, as user dropout does."""
    from diffpref.personalize.training import PPDConditioner

    class Encoder(torch.nn.Module):  # tokens = the mean of the examples + 1, so a kept user is never zero
        def forward(self, features, mask):
            mean = (features * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
            return (mean[:, :4] + 1).unsqueeze(1).expand(-1, 2, -1)

    conditioner = PPDConditioner(SimpleNamespace(ppd_shots_min=1, ppd_shots_max=2, ppd_user_dropout=0.0))
    conditioner.bank, conditioner.encoder, conditioner.num_tokens = _bank(), Encoder(), 2
    prompt = torch.zeros(6, 3, 4)
    out = conditioner.condition(prompt, torch.arange(6), [torch.Generator().manual_seed(i) for i in range(6)])
    user = out[:, -2:]
    assert user[[0, 1, 2, 5]].abs().sum(dim=(1, 2)).gt(0).all() and user[3:5].abs().sum() == 0
