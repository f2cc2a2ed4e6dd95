"""The training precisions (deepspeed.precision) and the torch dtype each one computes in, by name: config.py checks
the key against this table and engine/deepspeed.py builds its dtypes from it, without config importing torch."""

PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
