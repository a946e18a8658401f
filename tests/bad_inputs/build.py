"""Write the malformed-input corpus (run from anywhere: python tests/bad_inputs/build.py).

Each file is one way real batch files go wrong; README.md in this folder says
what the runner does with each, and tests/e2e/test_bad_inputs.py checks it.
The 5 MB prompt is made by the test itself rather than kept in the repository.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent


def line(**fields: object) -> bytes:
    return json.dumps(fields, ensure_ascii=False).encode() + b"\n"


GOOD_A = line(id="a", prompt="What is the capital of France?")
GOOD_B = line(id="b", prompt="Translate 'hello' to German.", tenant="globex")

FILES: dict[str, bytes] = {
    "empty.jsonl": b"",
    "only_blank_lines.jsonl": b"\n  \n\t\n",
    "bom.jsonl": b"\xef\xbb\xbf" + GOOD_A + GOOD_B,
    "crlf.jsonl": GOOD_A.replace(b"\n", b"\r\n") + GOOD_B.replace(b"\n", b"\r\n"),
    "blank_lines.jsonl": b"\n" + GOOD_A + b"\n\n" + GOOD_B + b"\n",
    "truncated_last_line.jsonl": GOOD_A + GOOD_B + b'{"id": "c", "prompt": "cut sh',
    "not_json_line.jsonl": GOOD_A + b"this is not json\n" + GOOD_B,
    "not_an_object.jsonl": GOOD_A + b'[1, 2, 3]\n"just a string"\n' + GOOD_B,
    "missing_prompt.jsonl": GOOD_A + line(id="c", tenant="acme") + GOOD_B,
    "wrong_types.jsonl": GOOD_A
    + line(id="c", prompt="x", max_tokens="ten")
    + line(id="d", messages="hello")
    + line(id="e", prompt="x", temperature="hot")
    + GOOD_B,
    "duplicate_ids.jsonl": GOOD_A + line(id="a", prompt="again") + GOOD_B,
    "invalid_utf8.jsonl": GOOD_A + b'{"id": "c", "prompt": "caf\xe9"}\n' + GOOD_B,
    "unknown_tenant.jsonl": GOOD_A + line(id="c", prompt="x", tenant="umbrella") + GOOD_B,
    "unknown_model.jsonl": GOOD_A + line(id="c", prompt="x", model="mystery-model-9") + GOOD_B,
    "model_not_allowed.jsonl": GOOD_A + line(id="c", prompt="x", model="gpt-4.1") + GOOD_B,
    "non_string_tenant.jsonl": GOOD_A + line(id="c", prompt="x", tenant=0) + GOOD_B,
    "all_garbage.jsonl": b"id,prompt\n1,hello\n",
    "duplicate_custom_ids.jsonl": b"".join(
        line(
            custom_id=cid,
            method="POST",
            url="/v1/chat/completions",
            body={"model": "deepseek-v3.2", "messages": [{"role": "user", "content": "hi"}]},
        )
        for cid in ("r1", "r2", "r1")
    ),
    "prompts.csv": b"id,prompt\n1,hello\n",
}


def parquet_files() -> dict[str, pa.Table]:
    return {
        "nulls_in_required.parquet": pa.table(
            {"id": ["a", None, "c"], "prompt": ["hi", "there", None]}
        ),
        "nested_columns.parquet": pa.table(
            {
                "id": ["a", "b"],
                "prompt": ["hi", "there"],
                "tags": pa.array([["x", "y"], []], pa.list_(pa.string())),
                "meta": pa.array(
                    [{"source": "crm", "score": 0.5}, None],
                    pa.struct([("source", pa.string()), ("score", pa.float64())]),
                ),
            }
        ),
        "wrong_column_name.parquet": pa.table({"id": ["a"], "question": ["hi"]}),
        "zero_rows.parquet": pa.table(
            {"id": pa.array([], pa.string()), "prompt": pa.array([], pa.string())}
        ),
    }


def main() -> None:
    for name, data in FILES.items():
        (HERE / name).write_bytes(data)
    for name, table in parquet_files().items():
        pq.write_table(table, HERE / name)


if __name__ == "__main__":
    main()
