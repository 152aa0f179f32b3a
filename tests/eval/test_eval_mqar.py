import pytest
import torch

from sasformer.eval.mqar import IGNORE, MQARConfig, markdown_table, mqar_batch


@pytest.mark.parametrize("config", [
    MQARConfig(num_kv_pairs=4, seq_len=24, vocab_size=32, num_queries=2),
    MQARConfig(num_kv_pairs=7, seq_len=63, vocab_size=41, num_queries=7),
    MQARConfig(num_kv_pairs=1, seq_len=4, vocab_size=5, num_queries=1),
])
def test_generator_properties(config):
    x, y = mqar_batch(config, 17, seed=3)
    assert x.shape == y.shape == (17, config.seq_len) and x.dtype == y.dtype == torch.long
    K, N = config.n_keys, config.num_kv_pairs
    assert int(x.max()) < config.vocab_size and int(x.min()) >= 0
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        keys, values = row_x[0: 2 * N: 2], row_x[1: 2 * N: 2]
        assert len(set(keys)) == N and all(1 <= k <= K for k in keys)
        assert all(K + 1 <= v < config.vocab_size for v in values)
        pairs = dict(zip(keys, values))
        queries = [t for t, target in enumerate(row_y) if target != IGNORE]
        assert len(queries) == config.num_queries
        assert all(t >= 2 * N for t in queries)
        assert len({row_x[t] for t in queries}) == len(queries)  # queried keys are distinct
        for t in queries:
            assert pairs[row_x[t]] == row_y[t]  # the key appeared earlier, with this value
            assert row_x[t + 1] == row_y[t]
        # outside the queries the tail is filler
        query_tokens = set(queries) | {t + 1 for t in queries}
        assert all(row_x[t] == 0 for t in range(2 * N, config.seq_len) if t not in query_tokens)


def test_generator_is_deterministic_by_seed():
    config = MQARConfig()
    a, b, c = mqar_batch(config, 8, seed=1), mqar_batch(config, 8, seed=1), mqar_batch(config, 8, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("knobs, message", [
    ({"vocab_size": 9, "num_kv_pairs": 5}, "num_kv_pairs=5 must be in"),
    ({"num_queries": 9, "num_kv_pairs": 8}, "num_queries=9"),
    ({"seq_len": 20, "num_kv_pairs": 8, "num_queries": 4}, "too short"),
])
def test_bad_knobs_are_rejected(knobs, message):
    with pytest.raises(ValueError, match=message):
        MQARConfig(**knobs)


def test_markdown_table():
    rows = [{"variant": "mha", "seed": 0, "accuracy": 0.5, "final_loss": 1.25, "params": 1234, "seconds": 2.0}]
    assert markdown_table(rows).splitlines()[2] == "| mha | 0 | 0.500 | 1.2500 | 1,234 | 2.0 |"


def test_tiny_mha_learns_recall_beyond_copying_a_value():
    # chance levels: a uniform guess among the 10 values scores 0.1; answering with any value of the
    # sequence scores 1 / num_kv_pairs = 0.25. Seeds 0-4 reach 0.49-0.60 after 400 steps.
    from sasformer.eval.mqar import train_mqar, variant_configs

    task = MQARConfig(num_kv_pairs=4, seq_len=16, vocab_size=20, num_queries=4)
    config = variant_configs(["mha"], task, d_model=32, n_layers=2, n_heads=2)["mha"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread avoids synchronisation overhead
    try:
        result = train_mqar(config, task, steps=400, batch_size=64, lr=3e-3, weight_decay=0.0, n_test=256, seed=0)
    finally:
        torch.set_num_threads(threads)
    assert result.final_loss < 0.5 * result.losses[0]
    assert result.accuracy > 0.4


@pytest.mark.parametrize("attention, overrides, expected", [
    # twice the heads at half the size stays that on the 4-head, d=64 probe (not an 8x wider attention)
    ("mha", {"n_heads": 16, "head_dim": 32}, {"n_heads": 8, "head_dim": 8}),
    ("sas", {"n_sim_heads": 32}, {"n_sim_heads": 16}),  # 4H
    ("sas", {"sim_head_dim": 64}, {"sim_head_dim": 16}),  # D' = D
    ("sas", {"n_kv_heads": 2}, {"n_kv_heads": 1}),  # a quarter of the heads
    ("sas", {"kernel_size": 1, "rope": "before", "peaa": "full"}, {"kernel_size": 1, "rope": "before", "peaa": "full"}),
    # rounded alone, 16 query heads over 2 key/value heads would become 7 over 2: kept a multiple
    ("gqa", {"n_heads": 16}, {"n_heads": 8}),
    # 100 / 4 = 25 would break RoPE, which rotates feature pairs: kept even
    ("sas", {"sim_head_dim": 100}, {"sim_head_dim": 24}),
])
def test_probe_attention_args_keep_the_ratios_of_the_trained_model(attention, overrides, expected):
    from sasformer.eval.mqar import probe_attention_args, variant_configs
    from sasformer.models.presets import SIZES, Size

    probe = Size(d_model=64, n_layers=2, n_heads=4, max_seq_len=64, vocab_size=64)
    args = probe_attention_args(attention, overrides, SIZES["mini"], probe)
    assert args == expected
    task = MQARConfig(seq_len=64, vocab_size=64)
    config = variant_configs([attention], task, 64, 2, 4, {attention: args})[attention]
    config.resolved_attention_args()  # a valid probe model
