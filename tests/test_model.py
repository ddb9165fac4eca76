"""The OneRec model: shapes, padding, MoE balancing, and FLOPs that MFU relies on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from onerec.model import OneRec
from onerec.runtime.config import N_FLAGS, OneRecConfig, flops_per_request
from onerec.runtime.ranking import rank_candidates


def _model(cfg: OneRecConfig, seed: int = 0) -> OneRec:
    torch.manual_seed(seed)
    n = cfg.n_items + 2
    return OneRec(
        cfg,
        item_vectors=torch.randn(n, cfg.item_vector_dim),
        item_author=torch.randint(0, cfg.n_authors + 1, (n,)),
        item_tag=torch.randint(0, cfg.n_tags + 1, (n,)),
        item_sids=torch.randint(0, cfg.codebook_size, (n, cfg.sid_levels)),
    ).eval()


def _inputs(
    cfg: OneRecConfig,
    b: int,
    life: int,
    seed: int = 0,
    short: int | None = None,
    positive: int | None = None,
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def ints(high: int, *shape: int) -> torch.Tensor:
        return torch.randint(1, high, shape, generator=g)

    s = cfg.short_len if short is None else short
    p = cfg.positive_len if positive is None else positive
    return {
        "static": torch.stack(
            [torch.randint(0, c, (b,), generator=g) for c in cfg.static_cardinalities], 1
        ),
        "short_items": ints(cfg.n_items + 1, b, s),
        "short_gap": ints(33, b, s),
        "short_watch": ints(10, b, s),
        "short_flags": torch.rand(b, s, N_FLAGS, generator=g).round(),
        "pos_items": ints(cfg.n_items + 1, b, p),
        "pos_gap": ints(33, b, p),
        "pos_watch": ints(10, b, p),
        "pos_flags": torch.rand(b, p, N_FLAGS, generator=g).round(),
        "life_items": ints(cfg.n_items + 1, b, life),
        "life_gap": ints(33, b, life),
        "life_weight": ints(18, b, life),
    }


SMALL = OneRecConfig(
    n_items=500,
    static_cardinalities=(7, 3, 12),
    n_authors=40,
    n_tags=30,
    codebook_size=32,
    d_model=32,
    n_heads=2,
    d_ff=64,
    d_expert=48,
    positive_len=64,
    lifelong_len=300,
    n_queries=16,
)


def _request_flops(
    model: OneRec, cfg: OneRecConfig, beam: int, life: int, short: int | None = None, positive=None
) -> int:
    """What serving executes for one request: encoder once, cross K/V once, L cached
    decode steps (the first on BOS alone), then the ranking stage scores ``beam``
    candidates."""
    inputs = _inputs(cfg, 1, life, short=short, positive=positive)
    model.requires_grad_(False)  # the counter's module tracker trips over leaf parameters
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        memory, keep = model.encoder(**inputs)
        kv = model.decoder.cross_kv(memory)
        logp, past = model.decoder.cached_step(None, [], kv, keep)
        code = logp.argmax(-1).expand(1, beam)
        past = [(k.expand(-1, beam, -1, -1, -1), v.expand(-1, beam, -1, -1, -1)) for k, v in past]
        for _ in range(1, cfg.sid_levels):
            logp, past = model.decoder.cached_step(code, past, kv, keep)
            code = logp.argmax(-1)
        candidates = model.encoder.item.weight[1 : beam + 1]
        candidates @ model.user(inputs["short_items"])[0]
    return counter.get_total_flops()


@pytest.mark.parametrize("beam", [1, 16, 64])
def test_flops_match_the_flop_counter_small(beam: int) -> None:
    model = _model(SMALL)
    measured = _request_flops(model, SMALL, beam, SMALL.lifelong_len)
    assert abs(flops_per_request(SMALL, beam) - measured) / measured < 0.10


def test_flops_follow_a_light_users_own_pathway_lengths() -> None:
    """A user with 5 recent and 17 positive events runs a much shorter encoder: MFU must
    count that, not the config's maxima."""
    model = _model(SMALL)
    measured = _request_flops(model, SMALL, 16, 40, short=5, positive=17)
    predicted = flops_per_request(SMALL, 16, 40, short_items=5, positive_items=17)
    assert abs(predicted - measured) / measured < 0.10
    assert predicted < 0.8 * flops_per_request(SMALL, 16, 40)


def test_flops_match_the_flop_counter_default_sizes() -> None:
    cfg = OneRecConfig(n_items=1000, static_cardinalities=(7, 3), n_authors=10, n_tags=10)
    model = _model(cfg)
    measured = _request_flops(model, cfg, 64, cfg.lifelong_len)
    predicted = flops_per_request(cfg, 64)
    assert abs(predicted - measured) / measured < 0.10


def test_loss_is_finite_and_backpropagates() -> None:
    model = _model(SMALL).train()
    inputs = _inputs(SMALL, 4, 50)
    targets = torch.randint(0, SMALL.codebook_size, (4, SMALL.sid_levels))
    loss = model.loss(inputs, targets)
    assert torch.isfinite(loss)
    loss.backward()
    assert model.encoder.qformer.queries.grad is not None
    assert all(m.load.sum() > 0 for m in model.moe_layers())


def test_padding_does_not_change_the_output() -> None:
    """Extra padded positions in any pathway leave the encoder output unchanged."""
    model = _model(SMALL)
    inputs = _inputs(SMALL, 2, 40)
    padded = dict(inputs)
    for name in ("life_items", "life_gap", "life_weight"):
        padded[name] = torch.cat([inputs[name], torch.zeros(2, 25, dtype=torch.long)], 1)
    padded["short_items"] = inputs["short_items"].clone()
    padded["short_items"][:, -5:] = 0
    base = dict(inputs)
    base["short_items"] = padded["short_items"]
    with torch.no_grad():
        a, keep_a = model.encoder(**base)
        b, keep_b = model.encoder(**padded)
    torch.testing.assert_close(a[keep_a], b[keep_b], atol=1e-5, rtol=1e-5)


def test_user_with_no_lifelong_history_is_encoded() -> None:
    model = _model(SMALL)
    inputs = _inputs(SMALL, 2, 10)
    for name in ("life_items", "life_gap", "life_weight"):
        inputs[name] = torch.zeros_like(inputs[name])
    with torch.no_grad():
        out, _ = model.encoder(**inputs)
    assert torch.isfinite(out).all()


def test_beams_share_cross_attention_and_match_a_per_beam_run() -> None:
    """Step on (B, W, t) with shared K/V equals running each beam on its own."""
    model = _model(SMALL)
    inputs = _inputs(SMALL, 2, 30)
    with torch.no_grad():
        memory, keep = model.encoder(**inputs)
        kv = model.decoder.cross_kv(memory)
        tokens = torch.randint(0, SMALL.codebook_size, (2, 5, 2))
        together = model.decoder.step(tokens, kv, keep)
        for w in range(5):
            alone = model.decoder.step(tokens[:, w : w + 1], kv, keep)
            torch.testing.assert_close(together[:, w : w + 1], alone, atol=1e-5, rtol=1e-5)


def test_loss_free_balancing_moves_the_bias_against_the_load() -> None:
    moe = _model(SMALL).moe_layers()[0]
    moe.load.copy_(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    moe.update_bias(rate=0.1)
    assert moe.bias[0] < 0 < moe.bias[1]
    assert moe.load.sum() == 0


def test_training_attention_matches_the_inference_path() -> None:
    """The fused kernel used under grad in training computes what the exported path does."""
    model = _model(SMALL)
    inputs = _inputs(SMALL, 3, 30)
    targets = torch.randint(0, SMALL.codebook_size, (3, SMALL.sid_levels))
    with torch.no_grad():
        reference = model.loss(inputs, targets)
    model.train()  # dropout is 0 by default, so only the attention kernel differs
    torch.testing.assert_close(model.loss(inputs, targets), reference, atol=1e-5, rtol=1e-5)


def test_multi_target_loss_averages_the_targets_and_ignores_padding() -> None:
    model = _model(SMALL)
    inputs = _inputs(SMALL, 2, 30)
    a = torch.randint(0, SMALL.codebook_size, (2, SMALL.sid_levels))
    b = torch.randint(0, SMALL.codebook_size, (2, SMALL.sid_levels))
    pad = torch.full_like(a, -1)
    with torch.no_grad():
        both = model.loss(inputs, torch.stack([a, b], 1))
        padded = model.loss(inputs, torch.stack([a, pad], 1))
        expected = (model.loss(inputs, a) + model.loss(inputs, b)) / 2
        torch.testing.assert_close(both, expected)
        torch.testing.assert_close(padded, model.loss(inputs, a))


def _successor_windows(n: int) -> torch.Tensor:
    """(n, short_len + 1) windows in which item ``k`` is always followed by ``k + 1``."""
    window = SMALL.short_len + 1
    starts = torch.randint(
        1, SMALL.n_items - window, (n, 1), generator=torch.Generator().manual_seed(0)
    )
    recent = starts + torch.arange(window)
    recent[: n // 4, :12] = 0  # some short histories, left-padded
    return recent


def test_next_item_head_learns_transitions_and_ranks_the_true_successor_first() -> None:
    """Training the head alone, as the ranking phase does, on its own item table drives its
    loss far down; then the served user vector, read from the short-term pathway (newest
    first), scores each user's true next item above 49 other candidates."""
    model = _model(SMALL).train()
    head = model.next_item
    recent = _successor_windows(32)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    first = head.loss(head.items, recent).item()
    for _ in range(80):
        loss = head.loss(head.items, recent)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first, (first, loss.item())
    model.eval()
    history, target = recent[:, :-1], recent[:, -1]
    others = torch.randint(
        1, SMALL.n_items + 1, (32, 49), generator=torch.Generator().manual_seed(1)
    )
    others = torch.where(others == target[:, None], 1 + target[:, None] % SMALL.n_items, others)
    tokens = torch.cat([others, target[:, None]], 1).numpy()  # the true item last: no tie help
    with torch.no_grad():
        users = model.user(history.flip(1)).numpy()
    table = head.served_table().numpy()
    order, _ = rank_candidates(users, table, tokens, np.zeros(tokens.shape, np.float32))
    assert (order[:, 0] == 49).mean() > 0.8


def test_joint_next_item_loss_trains_the_encoder_table_not_the_served_copy() -> None:
    """With the SID model the head teaches the table the pathways read; its served copy
    is only trained in the ranking phase, so that phase never moves the SID model's input."""
    model = _model(SMALL).train()
    inputs = _inputs(SMALL, 2, 30)
    targets = torch.randint(0, SMALL.codebook_size, (2, SMALL.sid_levels))
    model.losses(inputs, targets, _successor_windows(4))["next_item"].backward()
    assert model.encoder.item.weight.grad.abs().sum() > 0
    assert model.next_item.layers[0].attn.q.weight.grad.abs().sum() > 0
    assert model.next_item.items.weight.grad is None


def test_items_that_share_sid_codes_share_what_the_head_learns() -> None:
    """An item never seen as a target rises with the item whose SID codes it shares, while
    one whose codes differ falls, as every other item of the softmax does: the head's rows
    are ID plus SID-code embeddings."""
    torch.manual_seed(0)
    n = SMALL.n_items + 2
    sids = torch.randint(0, SMALL.codebook_size, (n, SMALL.sid_levels))
    target, twin, stranger = 7, 8, 9
    sids[twin] = sids[target]
    sids[stranger] = (sids[target] + 1) % SMALL.codebook_size
    head = OneRec(
        SMALL,
        item_vectors=torch.zeros(n, SMALL.item_vector_dim),  # no side information but SIDs
        item_author=torch.zeros(n, dtype=torch.long),
        item_tag=torch.zeros(n, dtype=torch.long),
        item_sids=sids,
    ).next_item
    padding = head.served_table()[[0, -1]]
    torch.testing.assert_close(padding, head.items.weight[[0, -1]].detach())  # no SID rows
    windows = _successor_windows(32)
    windows[:, -1] = target  # every window ends at the same item
    history = windows[:, :-1]
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)

    def scores() -> torch.Tensor:
        head.eval()
        with torch.no_grad():
            users = head.states(head.items, history)[:, -1]
            return (users @ head.served_table()[[twin, stranger]].T).mean(0)

    before = scores()
    for _ in range(30):
        head.train()
        loss = head.loss(head.items, windows, last=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    rise = scores() - before  # every other item is a negative of the softmax: it falls
    assert rise[0] > 1.0 and rise[1] < 0, rise


def test_head_loss_of_the_newest_position_only() -> None:
    """Validation scores each window's last event, not every position of it."""
    head = _model(SMALL).next_item
    recent = _successor_windows(8)
    with torch.no_grad():
        table = head.table(head.items)[1:-1]
        logits = head.states(head.items, recent[:, :-1])[:, -1] @ table.T
        expected = torch.nn.functional.cross_entropy(logits, recent[:, -1] - 1)
        torch.testing.assert_close(head.loss(head.items, recent, last=True), expected)
        assert head.loss(head.items, recent) != expected


def test_user_vector_reads_the_short_term_pathway_as_training_reads_its_windows() -> None:
    """Serving passes the short-term items newest first and right-padded to the batch's
    longest; training passes windows oldest first and left-padded. Both must give the same
    vector, whatever the padding."""
    model = _model(SMALL)
    recent = _successor_windows(8)
    history = recent[:, :-1]
    with torch.no_grad():
        trained = model.next_item.states(model.next_item.items, history)[:, -1]
        served = model.user(history.flip(1))
        newest = history.flip(1)[:, :12]  # a user with 12 events, in a batch padded to 20
        alone = model.user(newest)
        padded = model.user(torch.cat([newest, torch.zeros(8, 8, dtype=torch.long)], 1))
        shorter = model.user(newest[:, :5])
    torch.testing.assert_close(served, trained)
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(shorter, alone, atol=1e-3)  # older items do count


def test_next_item_loss_adds_to_the_sid_loss_and_handles_padded_windows() -> None:
    model = _model(SMALL)
    inputs = _inputs(SMALL, 2, 30)
    targets = torch.randint(0, SMALL.codebook_size, (2, SMALL.sid_levels))
    recent = torch.zeros(2, SMALL.short_len + 1, dtype=torch.long)
    recent[:, -2:] = torch.tensor([[5, 6], [7, 8]])  # one (input, target) pair per row
    with torch.no_grad():
        sid = model.loss(inputs, targets)
        both = model.loss(inputs, targets, recent)
        parts = model.losses(inputs, targets, recent)
    assert torch.isfinite(both) and both > sid
    assert set(parts) == {"sid", "next_item"}
    torch.testing.assert_close(parts["sid"], sid)
    torch.testing.assert_close(parts["sid"] + parts["next_item"], both)


def test_dense_moe_equals_the_dispatched_one() -> None:
    """The decoder's first level runs every expert and weights them by gate
    (DENSE_MOE_LEVELS): the same numbers as dispatching tokens to their top-k."""
    moe = _model(SMALL).moe_layers()[0]
    with torch.no_grad():
        moe.bias.copy_(torch.randn_like(moe.bias))  # routing that differs from the scores'
        x = torch.randn(3, 5, SMALL.d_model)
        torch.testing.assert_close(moe(x, dense=True), moe(x), atol=1e-6, rtol=1e-5)
