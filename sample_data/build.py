"""Rebuild the sample inputs from the real prompt files in ../shared/data.

    python sample_data/build.py

Writes prompts.parquet and prompts.jsonl (MT-Bench and Vicuna-bench questions
spread over three tenants; MT-Bench `turns` are two-turn conversations) and
openai_batch.jsonl (vLLM's OpenAI-batch example as published, then Vicuna-bench
questions as batch requests with a `tenant` field).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
TENANTS = ("acme", "globex", "initech")


def _questions(name: str, prefix: str) -> list[dict[str, object]]:
    rows = []
    with (SHARED / name).open(encoding="utf-8") as handle:
        for line in handle:
            question = json.loads(line)
            number = int(question["question_id"])
            rows.append(
                {
                    "id": f"{prefix}-{number}",
                    "tenant": TENANTS[number % len(TENANTS)],
                    "category": question["category"],
                    "turns": question["turns"],
                    "reference": question.get("reference"),
                    "source": prefix,
                }
            )
    return rows


def main() -> None:
    rows = _questions("mt_bench_questions.jsonl", "mt") + _questions(
        "vicuna_bench_questions.jsonl", "vicuna"
    )
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("tenant", pa.string()),
            ("category", pa.string()),
            ("turns", pa.list_(pa.string())),
            ("reference", pa.list_(pa.string())),
            ("source", pa.string()),
        ]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), HERE / "prompts.parquet")
    with (HERE / "prompts.jsonl").open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    with (HERE / "openai_batch.jsonl").open("w", encoding="utf-8") as handle:
        handle.write((SHARED / "openai_batch_example.jsonl").read_text(encoding="utf-8").strip())
        handle.write("\n")
        for row in rows:
            if row["source"] != "vicuna":
                continue
            request = {
                "custom_id": row["id"],
                "tenant": row["tenant"],
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "deepseek-v3.2",
                    "messages": [{"role": "user", "content": row["turns"][0]}],  # type: ignore[index]
                    "max_completion_tokens": 200,
                },
            }
            handle.write(json.dumps(request, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
