"""Hooks on every family: reading, editing, early exit, generate, cleanup on error."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from mmsae.errors import MmsaeError
from mmsae.hooks import capture, edit, run_until
from tiny_models import FAMILIES, family_params, tiny_adapter

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def two_samples(adapter):
    """A batch of two sequences of different lengths (so the first one is left-padded)."""
    images = [Image.new("RGB", (48, 36), (200, 30, 30)), Image.new("RGB", (30, 60), (20, 40, 220))] if adapter.has_vision else None
    batch = adapter.build_inputs(images, ["Hi", "What colour is the big shape in this picture?"])
    if id(adapter.model) not in baseline_hooks:
        tiny_inputs_cache[id(adapter.model)] = batch.inputs
        with torch.no_grad():
            adapter.model(**batch.inputs, output_hidden_states=True)
        baseline_hooks[id(adapter.model)] = hook_count(adapter.model)
    return batch


class AddToMlp(torch.nn.Module):
    """Wraps a decoder layer's MLP so the layer's output gains ``vector``: an edit made in the weights' path."""

    def __init__(self, mlp: torch.nn.Module, vector: torch.Tensor):
        super().__init__()
        self.mlp = mlp
        self.vector = vector

    def forward(self, x):
        return self.mlp(x) + self.vector


def model_with_added_vector(adapter, layer: int, vector: torch.Tensor):
    """A deep copy of the model whose decoder ``layer`` adds ``vector`` to the residual stream."""
    model = copy.deepcopy(adapter.model)
    decoder_layer = model.get_decoder().layers[layer]
    decoder_layer.mlp = AddToMlp(decoder_layer.mlp, vector)
    return model


def hook_count(module: torch.nn.Module) -> int:
    """Forward hooks on ``module`` and its children (transformers keeps its own capturing hooks)."""
    return sum(len(m._forward_hooks) for m in module.modules())


def no_hooks(module: torch.nn.Module) -> bool:
    """No hooks beyond those transformers installs for ``output_hidden_states``."""
    with torch.no_grad():  # make sure transformers' own hooks exist before counting
        module(**tiny_inputs_cache[id(module)], output_hidden_states=True)
    return hook_count(module) == baseline_hooks[id(module)]


tiny_inputs_cache: dict[int, dict] = {}
baseline_hooks: dict[int, int] = {}


@pytest.mark.parametrize("family", family_params())
def test_capture_equals_output_hidden_states(family):
    adapter = tiny_adapter(family)
    batch = two_samples(adapter)
    with torch.no_grad(), capture(adapter.layer_module(0)) as c0, capture(adapter.layer_module(adapter.num_layers - 1)) as clast:
        out = adapter.model(**batch.inputs, output_hidden_states=True)
    hidden = out.hidden_states
    assert len(hidden) == adapter.num_layers + 1
    assert len(c0) == 1 and c0.last.shape == (*batch.input_ids.shape, adapter.hidden_size)
    torch.testing.assert_close(c0.last, hidden[1], rtol=0, atol=0)
    for layer in range(1, adapter.num_layers - 1):
        with torch.no_grad(), capture(adapter.layer_module(layer)) as c:
            adapter.model(**batch.inputs)
        torch.testing.assert_close(c.last, hidden[layer + 1], rtol=0, atol=0)
    # the last entry of output_hidden_states is after the final norm
    torch.testing.assert_close(adapter.language_model().norm(clast.last), hidden[-1], rtol=1e-6, atol=1e-6)
    assert no_hooks(adapter.model)


@pytest.mark.parametrize("family", family_params())
def test_run_until_equals_full_forward_and_skips_later_layers(family):
    adapter = tiny_adapter(family)
    batch = two_samples(adapter)
    with torch.no_grad():
        hidden = adapter.model(**batch.inputs, output_hidden_states=True).hidden_states
    later_calls = []
    handle = adapter.layer_module(1).register_forward_hook(lambda *a: later_calls.append(1))
    try:
        early = run_until(adapter, 0, batch)
    finally:
        handle.remove()
    torch.testing.assert_close(early, hidden[1], rtol=0, atol=0)
    assert later_calls == []
    torch.testing.assert_close(run_until(adapter, 1, batch.inputs), hidden[2], rtol=0, atol=0)
    assert no_hooks(adapter.model)


@pytest.mark.parametrize("family", family_params())
def test_edit_equals_model_with_modified_layer(family):
    adapter = tiny_adapter(family)
    batch = two_samples(adapter)
    layer = 1
    vector = torch.randn(adapter.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = adapter.model(**batch.inputs).logits
        with edit(adapter.layer_module(layer), lambda h: h + vector):
            edited = adapter.model(**batch.inputs).logits
        expected = model_with_added_vector(adapter, layer, vector)(**batch.inputs).logits
    torch.testing.assert_close(edited, expected, rtol=1e-5, atol=1e-5)
    mask = batch.attention_mask.bool()
    assert (edited - plain)[mask].abs().max() > 1e-2  # the edit does change the logits
    assert no_hooks(adapter.model)


@pytest.mark.parametrize("family", family_params())
def test_hooks_removed_after_exception(family):
    adapter = tiny_adapter(family)
    batch = two_samples(adapter)
    module = adapter.layer_module(0)

    def broken(h):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), capture(module), edit(module, broken):
        adapter.model(**batch.inputs)
    with pytest.raises(ValueError, match="shape"), edit(module, lambda h: h[:, :1]):
        adapter.model(**batch.inputs)
    assert no_hooks(adapter.model)
    # run_until after a failed run still works and leaves nothing behind
    run_until(adapter, 0, batch)
    assert no_hooks(adapter.model)


@pytest.mark.parametrize("family", family_params())
def test_edit_and_capture_inside_generate(family):
    adapter = tiny_adapter(family)
    batch = two_samples(adapter)
    layer, new_tokens = 1, 4
    vector = 3.0 * torch.randn(adapter.hidden_size, generator=torch.Generator().manual_seed(2))
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        with edit(adapter.layer_module(layer), lambda h: h + vector), capture(adapter.layer_module(layer)) as seen:
            hooked = adapter.model.generate(**batch.inputs, **gen)
        reference = model_with_added_vector(adapter, layer, vector).generate(**batch.inputs, **gen)
    assert torch.equal(hooked.sequences, reference.sequences)
    for a, b in zip(hooked.scores, reference.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # prefill sees the prompt, each decode step one token
    prompt_len = batch.input_ids.shape[1]
    assert [o.shape[1] for o in seen.outputs] == [prompt_len] + [1] * (new_tokens - 1)
    # the captured (edited) stream equals a teacher-forced pass over the generated sequence
    seq = hooked.sequences[:, :-1]
    forced = dict(batch.inputs, input_ids=seq)
    for key, value in batch.inputs.items():  # extend the per-token inputs over the new tokens
        if key != "input_ids" and isinstance(value, torch.Tensor) and value.shape == batch.input_ids.shape:
            # attention_mask: real tokens; token_type_ids (PaliGemma): 1 = generated suffix, causal;
            # mm_token_type_ids (Qwen): 0 = text
            fill = 1 if key in ("attention_mask", "token_type_ids") else 0
            forced[key] = torch.cat([value, torch.full((seq.shape[0], seq.shape[1] - prompt_len), fill, dtype=value.dtype)], dim=1)
    with torch.no_grad(), edit(adapter.layer_module(layer), lambda h: h + vector), capture(adapter.layer_module(layer)) as full:
        adapter.model(**forced)
    mask = forced["attention_mask"].bool()
    torch.testing.assert_close(seen.concat()[mask], full.last[mask], rtol=1e-4, atol=1e-4)
    assert no_hooks(adapter.model)


@pytest.mark.parametrize("family", family_params([f for f in FAMILIES if f != "llama"]))
def test_capture_vision_tower_block(family):
    adapter = tiny_adapter(family)
    batch = two_samples(adapter)
    blocks = adapter.vision_layers()
    assert len(blocks) == 2  # the tiny towers have two blocks
    with torch.no_grad(), capture(adapter.vision_layer_module(1)) as seen:
        adapter.model(**batch.inputs)
    assert len(seen) == 1 and seen.last.shape[-1] == 32 and seen.last.isfinite().all()
    with pytest.raises(MmsaeError, match="out of range"):
        adapter.vision_layer_module(2)
    assert no_hooks(adapter.model)


def test_text_only_model_has_no_vision_tower():
    with pytest.raises(MmsaeError, match="no vision tower"):
        tiny_adapter("llama").vision_layers()
