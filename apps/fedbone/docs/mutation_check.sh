#!/bin/bash
# FedBone mutation check: apply each mutation to strategies/fedbone.py, run its colocated tests
# (each must fail at least one), restore the file. Run from anywhere: bash apps/fedbone/docs/mutation_check.sh
cd "$(dirname "$0")/../../.."
B=$(mktemp)
F=strategies/fedbone.py
cp $F "$B"
mut() {  # name, python replace old new [pytest target, default the strategy's tests]
  python3 - "$2" "$3" <<'PY'
import sys
p="strategies/fedbone.py"; s=open(p).read(); old,new=sys.argv[1],sys.argv[2]
assert s.count(old)>=1, old
open(p,"w").write(s.replace(old,new,1))
PY
  [ $? -eq 0 ] || { echo "$1: PATTERN NOT FOUND"; cp "$B" $F; return; }
  .venv/bin/pytest -q -p no:cacheprovider ${4:-strategies/fedbone_test.py} -W ignore 2>&1 | tail -1 | sed "s/^/$1: /"
  cp "$B" $F
}
mut "pcgrad sign flipped" "p = p - (dot / nn) * orig[j]" "p = p + (dot / nn) * orig[j]"
mut "pcgrad denominator ||g_i||^2" "nn = float(np.dot(orig[j], orig[j]))" "nn = float(np.dot(p, p))"
mut "pcgrad against projected, not original" "dot = float(np.dot(p, orig[j]))" "dot = float(np.dot(p, out[j] if j < len(out) else orig[j]))"
mut "conflict test cos > 0" "_cos(grads[i], grads[j]) < 0 for i, j in pairs" "_cos(grads[i], grads[j]) > 0 for i, j in pairs"
mut "attention softmax of -cos" "e = np.exp(c - c.max())" "e = np.exp(-c + c.min())"
mut "attention rescale without K" "gs = [k * a * g for a, g" "gs = [a * g for a, g"
mut "projection switch forced on" "return (projected if projection else plain), info" "return projected, info"
mut "attention switch forced off" "if attention:
        gs = [k" "if False:
        gs = [k"
mut "EMA weights swapped" "return beta * history + (1.0 - beta)" "return (1.0 - beta) * history + beta"
mut "pc_change relative to the projected mean" "norm(projected - plain)) / norm if" "norm(projected - plain)) / float(np.linalg.norm(projected)) if"
mut "cancel over the sum of norms" "mean_norm = float(np.mean([np.linalg.norm" "mean_norm = float(np.sum([np.linalg.norm"
mut "client sampling forced off" "if k >= len(nodes):" "if True:" "apps/fedbone/tests/test_fedbone_app.py -k sampling"
cmp -s "$B" $F && echo "reverted OK"
