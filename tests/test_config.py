"""Job and tenants files: what loads, and errors that name the file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.config import Job, load_job
from runner.errors import ConfigError
from tests.conftest import REPO, JobWriter


def test_the_shipped_example_job_loads_with_paths_resolved_against_its_folder() -> None:
    job = load_job(REPO / "jobs" / "example.toml")
    assert job.job.input == REPO / "sample_data" / "prompts.parquet"
    assert job.job.output == REPO / "out" / "example.parquet"
    assert job.input.prompt == "turns"
    assert set(job.tenants) == {"acme", "globex", "initech"}
    assert job.price_table()["deepseek-v3.2"].output == 420_000


def test_a_tenants_file_is_shared_and_job_prices_override_it(tmp_path: Path) -> None:
    (tmp_path / "tenants.toml").write_text(
        '[tenants.acme]\nrpm = 5\n[prices."m"]\ninput = 1\noutput = 2\n', encoding="utf-8"
    )
    (tmp_path / "job.toml").write_text(
        'tenants = "tenants.toml"\n[job]\nname = "j"\ninput = "in.jsonl"\noutput = "o.parquet"\n'
        '[prices."m"]\ninput = 3\noutput = 4\n',
        encoding="utf-8",
    )
    job = load_job(tmp_path / "job.toml")
    assert job.tenants["acme"].rpm == 5
    assert job.price_table()["m"].input == 3_000_000


def test_the_job_round_trips_through_the_json_stored_with_its_run() -> None:
    job = load_job(REPO / "jobs" / "openai_batch.toml")
    assert Job.from_json(job.to_json()) == job
    example = load_job(REPO / "jobs" / "example.toml")
    again = Job.from_json(example.to_json())
    assert again == example
    assert again.input.required_columns() == {"id", "tenant", "turns"}  # only what it names


def test_key_variable_defaults_to_the_tenant_name(write_job: JobWriter) -> None:
    job = load_job(write_job(Path("in.jsonl"), tenants={"acme-eu.2": {"rpm": 1}}, job=""))
    assert job.key_env("acme-eu.2") == "ACME_EU_2_API_KEY"


@pytest.mark.parametrize(
    ("tenant_settings", "expected"),
    [
        ({"rpmm": 5}, r"\[tenants.acme\] rpmm: unknown key"),
        ({"rpm": "fast"}, r"\[tenants.acme\] rpm: Input should be a valid integer"),
        ({"rpm": 0}, r"\[tenants.acme\] rpm: Input should be greater than 0"),
        ({"api_key_env": "sk-live-123"}, r"api_key_env: .*environment variable name"),
    ],
)
def test_a_wrong_tenant_setting_names_the_file_the_table_and_the_key(
    write_job: JobWriter, tenant_settings: dict[str, object], expected: str
) -> None:
    path = write_job(Path("in.jsonl"), tenants={"acme": tenant_settings})
    with pytest.raises(ConfigError, match=expected) as caught:
        load_job(path)
    assert str(path) in str(caught.value)


def test_missing_required_keys_and_bad_defaults_are_named(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text('[job]\ninput = "x"\n[tenants.a]\n', encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_job(path)
    assert "[job] name: required key is missing" in str(caught.value)
    assert "[job] output: required key is missing" in str(caught.value)


def test_an_unknown_default_tenant_is_refused(write_job: JobWriter) -> None:
    with pytest.raises(ConfigError, match="default_tenant 'nobody' is not a configured tenant"):
        load_job(write_job(Path("in.jsonl"), job='default_tenant = "nobody"'))


def test_a_price_with_more_than_six_decimals_is_refused(write_job: JobWriter) -> None:
    extra = '[prices."m"]\ninput = 0.0000001\noutput = 1\n'
    with pytest.raises(ConfigError, match=r"\[prices.m.input\]|prices.m\] input"):
        load_job(write_job(Path("in.jsonl"), extra=extra))


def test_not_toml_and_missing_files_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[job\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_job(bad)
    with pytest.raises(ConfigError, match=r"nope\.toml: no such file"):
        load_job(tmp_path / "nope.toml")


def test_a_base_url_must_be_http(write_job: JobWriter) -> None:
    with pytest.raises(ConfigError, match=r"\[provider\] base_url"):
        load_job(write_job(Path("in.jsonl"), base_url="ftp://example"))


@pytest.mark.parametrize(
    ("tenant_settings", "expected"),
    [
        ({"rpm": True}, r"\[tenants.acme\] rpm: Input should be a valid integer"),
        ({"rpm": "600"}, r"\[tenants.acme\] rpm: Input should be a valid integer"),
        ({"monthly_budget_usd": -1}, r"monthly_budget_usd: Input should be greater than or equal"),
        ({"allowed_models": "gpt-4.1"}, r"allowed_models: Input should be a valid list"),
        ({"budget_period": "week"}, r"budget_period: Input should be 'month', 'day' or 'total'"),
    ],
)
def test_wrong_types_are_not_silently_converted(
    write_job: JobWriter, tenant_settings: dict[str, object], expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_job(write_job(Path("in.jsonl"), tenants={"acme": tenant_settings}))


@pytest.mark.parametrize(
    ("provider", "expected"),
    [
        ("timeout_s = inf", r"\[provider\] timeout_s: Input should be a finite number"),
        ("max_backoff_s = nan", r"\[provider\] max_backoff_s: Input should be a finite number"),
        ('timeout_s = "60"', r"\[provider\] timeout_s: Input should be a valid number"),
    ],
)
def test_provider_numbers_must_be_finite_numbers(
    write_job: JobWriter, provider: str, expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_job(write_job(Path("in.jsonl"), provider=provider))


@pytest.mark.parametrize("value", ["0", "-1", "65", "1.5", "true", '"2"', '"many"', '""'])
def test_processes_is_auto_or_a_count_and_anything_else_is_named_once(
    write_job: JobWriter, value: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        load_job(write_job(Path("in.jsonl"), job=f"processes = {value}"))
    problems = str(refused.value).splitlines()[1:]
    assert problems == ['  [job] processes: Value error, use "auto" or a whole number from 1 to 64']


@pytest.mark.parametrize(("value", "expected"), [('"auto"', "auto"), ("1", 1), ("64", 64)])
def test_processes_takes_auto_or_a_count(
    write_job: JobWriter, value: str, expected: object
) -> None:
    job = load_job(write_job(Path("in.jsonl"), job=f"processes = {value}"))
    assert job.job.processes == expected


def test_the_output_must_be_a_parquet_file(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text(
        '[job]\nname = "j"\ninput = "in.jsonl"\noutput = "out.csv"\n[tenants.a]\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match=r"\[job\] output: .*must end in \.parquet"):
        load_job(path)


def test_a_price_multiplier_scales_every_price(write_job: JobWriter) -> None:
    job = load_job(write_job(Path("in.jsonl"), provider="price_multiplier = 0.8"))
    assert job.price_table()["deepseek-v3.2"].output == 336_000  # 0.42 * 0.8
    assert job.price_table()["gpt-4.1"].cached_input == 400_000  # 0.50 * 0.8


def test_the_ray_engine_is_set_in_the_job_file_and_its_mistakes_are_named(
    write_job: JobWriter, tmp_path: Path
) -> None:
    job = load_job(
        write_job(
            tmp_path / "in.jsonl",
            job='engine = "ray"',
            extra='[ray]\naddress = "10.0.0.5:6379"\nworkers = 8\nmerge = true\n',
        )
    )
    assert (job.job.engine, job.ray.address, job.ray.workers, job.ray.merge) == (
        "ray",
        "10.0.0.5:6379",
        8,
        True,
    )
    assert load_job(write_job(tmp_path / "in.jsonl")).job.engine == "local"
    with pytest.raises(ConfigError, match=r"\[ray\] workers: Input should be greater than"):
        load_job(write_job(tmp_path / "in.jsonl", extra="[ray]\nworkers = 0\n"))
    with pytest.raises(ConfigError, match=r"\[job\] engine: Input should be 'local' or 'ray'"):
        load_job(write_job(tmp_path / "in.jsonl", job='engine = "spark"'))
