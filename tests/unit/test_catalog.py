"""Teacher and student catalogs: contents, resolution, overrides by directory and ConfigMap data."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubedistill.catalog import load_catalog

PROVIDERS = {"openai", "anthropic", "google", "deepseek", "groq", "mistral", "together"}
STUDENTS = {
    "qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b",
    "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "gemma-3-1b", "gemma-3-4b",
    "smollm2-135m", "smollm2-360m", "smollm2-1.7b", "phi-4-mini",
}  # fmt: skip


def test_packaged_catalog_covers_providers_and_students() -> None:
    cat = load_catalog(environ={})
    assert set(cat.providers) >= PROVIDERS
    assert {t.id.split("/", 1)[0] for t in cat.teachers.values()} == PROVIDERS
    for teacher in cat.teachers.values():
        assert teacher.price_date and teacher.input_per_m_tok > 0 and teacher.output_per_m_tok > 0
        assert cat.resolve_teacher(teacher.id).base_url.startswith("https://")  # type: ignore[union-attr]
    assert set(cat.students) == STUDENTS
    for student in cat.students.values():
        assert "/" in student.hf_id and student.params_b > 0 and cat.lora_targets(student.id)


def test_resolution_of_known_unknown_and_local_teachers() -> None:
    cat = load_catalog(environ={})
    gpt = cat.resolve_teacher("openai/gpt-4o-mini")
    assert (gpt.api_model, gpt.base_url, gpt.supports_n, gpt.known_price) == (
        "gpt-4o-mini",
        "https://api.openai.com/v1",
        True,
        True,
    )
    assert gpt.cost(1_000_000, 1_000_000) == pytest.approx(0.15 + 0.60)
    nested = cat.resolve_teacher("together/meta-llama/Llama-3.3-70B-Instruct-Turbo")
    assert nested.api_model == "meta-llama/Llama-3.3-70B-Instruct-Turbo"
    new_model = cat.resolve_teacher("anthropic/claude-next")
    assert new_model.base_url == "https://api.anthropic.com/v1" and not new_model.supports_n
    assert new_model.cost(10**6, 10**6) == 0 and "price is unknown" in new_model.note
    custom = cat.resolve_teacher("my-vllm-model", "http://vllm:8000/v1")
    assert (custom.api_model, custom.base_url, custom.known_price) == (
        "my-vllm-model",
        "http://vllm:8000/v1",
        False,
    )
    local = cat.resolve_teacher("local/smollm2-135m", "http://127.0.0.1:8080/v1")
    assert (local.api_model, local.known_price, local.note) == ("smollm2-135m", True, "")
    assert cat.resolve_teacher("nowhere").base_url is None


def test_students_by_catalog_or_hf_id_and_throughput() -> None:
    cat = load_catalog(environ={})
    assert cat.student("Qwen/Qwen3-0.6B") is cat.student("qwen3-0.6b")
    assert cat.student("org/unknown") is None and cat.lora_targets("org/unknown") == []
    assert cat.lora_targets("phi-4-mini") == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert cat.training_tokens_per_second(0.5) == 18000
    assert 7000 < cat.training_tokens_per_second(1.0) < 18000
    assert cat.training_tokens_per_second(16.0) == pytest.approx(700)


def test_directory_override_merges_by_id(tmp_path: Path) -> None:
    (tmp_path / "teachers.yaml").write_text(
        "providers:\n  acme: {baseURL: 'http://acme/v1', supportsN: true}\n"
        "teachers:\n"
        "  - {id: acme/big, inputPerMTok: 1, outputPerMTok: 2, priceDate: '2026-11-01'}\n"
        "  - {id: openai/gpt-4o, inputPerMTok: 9, outputPerMTok: 9, priceDate: '2026-11-01'}\n"
    )
    cat = load_catalog(environ={"KUBEDISTILL_CATALOG_DIR": str(tmp_path)})
    assert cat.resolve_teacher("acme/big").base_url == "http://acme/v1"
    assert cat.resolve_teacher("openai/gpt-4o").input_per_m_tok == 9
    assert cat.resolve_teacher("openai/gpt-4o-mini").input_per_m_tok == 0.15  # untouched entries stay
    assert len(cat.students) == len(STUDENTS)


def test_config_map_data_override_wins_over_directory(tmp_path: Path) -> None:
    (tmp_path / "students.yaml").write_text(
        "students:\n  - {id: tiny, hfId: org/tiny, paramsB: 0.01, minVramGB: 1, typicalTrainingMinutes: 1,"
        " chatFamily: chatml, charsPerToken: 4}\n"
    )
    data = {
        "students.yaml": "students:\n  - {id: tiny, hfId: org/tiny-v2, paramsB: 0.02, minVramGB: 1,"
        " typicalTrainingMinutes: 1, chatFamily: chatml, charsPerToken: 4}\n"
    }
    cat = load_catalog(directory=tmp_path, data=data, environ={})
    tiny = cat.student("tiny")
    assert tiny is not None and tiny.hf_id == "org/tiny-v2"
    with pytest.raises(ValueError):
        load_catalog(data={"teachers.yaml": "teachers:\n  - {id: x/y, inputPerMTok: -1}\n"}, environ={})


def test_request_shape_flags() -> None:
    cat = load_catalog(environ={})
    gpt5 = cat.resolve_teacher("openai/gpt-5")
    assert (gpt5.max_tokens_param, gpt5.supports_temperature) == ("max_completion_tokens", False)
    assert cat.resolve_teacher("openai/gpt-4o").supports_temperature
    assert cat.resolve_teacher("openai/some-new-model").max_tokens_param == "max_completion_tokens"
    assert cat.resolve_teacher("groq/llama-3.1-8b-instant").max_tokens_param == "max_tokens"
