import torch

from sasformer import DecoderLM, preset
from sasformer.ops.rope import RotaryCache, RotaryTables


def test_precomputed_tables_equal_computed():
    cache = RotaryCache([8, 6], max_len=40, theta=500.0)
    positions = torch.tensor([[0, 3, 39], [5, 5, 1]])
    fast, plain = cache.tables(positions, seq_len=40), RotaryTables(positions, 500.0)
    assert fast.precomputed and not plain.precomputed
    for dim in (8, 6):
        for a, b in zip(fast(dim), plain(dim)):
            torch.testing.assert_close(a, b)
    assert not cache.tables(positions, seq_len=41).precomputed  # past the table: computed on the fly
    assert not any(k.startswith("rotary") for k in DecoderLM(preset("tiny", "mha")).state_dict())


def test_model_longer_than_trained_context_matches_computed_tables():
    model = DecoderLM(preset("tiny", "sas", max_seq_len=16, n_layers=1)).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    with torch.no_grad():
        long = model(ids)  # 40 > 16: tables computed on the fly
        short = model(ids[:, :16])  # within the table: gathered
    torch.testing.assert_close(long[:, :16], short, rtol=1e-5, atol=1e-5)


def test_contiguous_positions_are_sliced_and_equal_gathered():
    cache = RotaryCache([8, 6], max_len=40, theta=500.0)
    positions = torch.arange(5, 12).unsqueeze(0)
    sliced, gathered = cache.tables(positions, 12, first_position=5), cache.tables(positions, 12)
    for dim in (8, 6):
        for a, b in zip(sliced(dim), gathered(dim)):
            assert a.shape == b.shape == (1, 7, dim)
            assert a._base is not None  # a view of the table, not a gathered copy
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_training_forward_reads_the_tables_without_a_gather():
    # a gather makes the compiled RoPE kernels (forward and backward) load the tables indirectly
    import operator

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = DecoderLM(preset("tiny", "mha", n_layers=1))
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    torch.compile(model, backend=record, fullgraph=True)(ids).sum().backward()
    assert len(graphs) == 1
    tensor_indexed = [n for n in graphs[0].graph.nodes if n.target is operator.getitem
                      and isinstance(n.args[1], torch.fx.Node)]
    assert not tensor_indexed, [n.format_node() for n in tensor_indexed]
