"""Time and bytes of one CKKS round trip (encrypt on K clients, add on the server, decrypt)
for what is trained: the top ``train-layers`` layers of all-MiniLM-L6-v2 (or the whole encoder
with ``--whole``). Prints one line per setting. Example::

    python -m fede4rag.he_cost --layers 1 --clients 5
"""

from __future__ import annotations

import argparse
import time


def measure(num_values: int, clients: int, poly_degree: int = 8192) -> dict[str, float]:
    import numpy as np
    import tenseal as ts
    from flwr.app import Array, ArrayRecord

    from flowerbed.strategies.fede4rag import add_ciphertexts, encrypt_arrays, new_context

    ctx = new_context(poly_degree)
    public = ts.context_from(ctx.serialize(save_secret_key=False))
    rng = np.random.default_rng(0)
    ups = [
        ArrayRecord({"x": Array(rng.normal(size=num_values).astype(np.float32))})
        for _ in range(clients)
    ]
    t0 = time.perf_counter()
    enc = [encrypt_arrays(ctx, u) for u in ups]
    t_enc = (time.perf_counter() - t0) / clients
    t0 = time.perf_counter()
    total = add_ciphertexts(public, enc)
    t_add = time.perf_counter() - t0
    t0 = time.perf_counter()
    vec = np.asarray(ts.ckks_vector_from(ctx, total["ciphertext"].numpy().tobytes()).decrypt())
    t_dec = time.perf_counter() - t0
    ref = np.sum([u["x"].numpy().astype(np.float64) for u in ups], axis=0)
    return {
        "values": num_values,
        "encrypt_s_per_client": t_enc,
        "add_s": t_add,
        "decrypt_s": t_dec,
        "ciphertext_bytes_per_client": int(enc[0]["ciphertext"].numpy().size),
        "plain_bytes_per_client": 4 * num_values,
        "max_abs_error_of_sum": float(np.abs(vec - ref).max()),
    }


def main(argv: list[str] | None = None) -> None:
    from fede4rag.task import make_encoder, parse_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1, help="top layers trained (0 = whole)")
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--model", default="minilm")
    args = ap.parse_args(argv)
    cfg = parse_config({"model": args.model, "train-layers": args.layers})
    rec = make_encoder(cfg).to_record()
    n = sum(rec[k].numpy().size for k in rec)
    print(f"[fede4rag] CKKS cost, train-layers={args.layers}, {n} values:", flush=True)
    print(measure(n, args.clients), flush=True)


if __name__ == "__main__":
    main()
