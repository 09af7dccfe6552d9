#!/usr/bin/env bash
# Issue 12's engines benchmark in one run on this host: every CPU engine and compile target this
# host can execute, for prefill fp32, bf16 and fp16 (D 64/128, L 2048/8192, none/causal/ALiBi) and
# decode, next to libtorch SDPA (timed by the same prefill_bench / decode_bench processes) and
# torch.compile(flex_attention) (bench/engines_torch.py), as one Markdown table plus the JSONs.
#
#   scripts/engines_bench.sh OUTDIR [--quick]
#
# Runs, in order (the machine should be otherwise idle; ~35 minutes on 2 cores, --quick: L 2048
# only, one repetition, no decode, a few minutes):
#   prefill-host.json     the host target, each dtype on its default engine (AMX or vdpbf16ps for
#                         bf16 where present, AMX for fp16 where present), with SDPA;
#   prefill-host-fma.json bf16 (and fp16 on AMX hosts) on the FMA engine (FLEXJIT_AMX=0
#                         FLEXJIT_DPBF16=0), only where the default engine is another one;
#   prefill-v3.json       FLEXJIT_CPU_TARGET=x86-64-v3 (AVX2 + FMA, 16 registers) where the host is
#                         AVX-512 (on an AVX2 host it is one more build of the same kind);
#   prefill-v4.json       FLEXJIT_CPU_TARGET=x86-64-v4 where the host can run it and is not it;
#   torch.json            torch.compile(flex_attention) on the same prefill cases;
#   decode.json           decode_bench (Llama-3.1-8B attention and MQA, KV 8k/32k, contiguous and
#                         paged) with SDPA;
#   engines.md            scripts/engines_report.py over the prefill files, then the decode table.
# Each prefill JSON records the instruction ceilings (512- and 256-bit FMA, vdpbf16ps, AMX) that run
# measured; the table's percentages are against the ceiling of the engine's own instruction.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:?usage: scripts/engines_bench.sh OUTDIR [--quick]}
QUICK=${2:-}
mkdir -p "$OUT"
BENCH="$ROOT/build/bench"
for b in prefill_bench decode_bench; do
  [[ -x "$BENCH/$b" ]] || { echo "engines_bench: $BENCH/$b missing: run ./scripts/build.sh first" >&2; exit 2; }
done

if [[ "$QUICK" == "--quick" ]]; then
  LS='2048'; REPS=1; TORCH_FILTER='L2048'
else
  LS='2048|8192'; REPS=3; TORCH_FILTER=''
fi
AGG=(--benchmark_repetitions=$REPS --benchmark_report_aggregates_only=true --benchmark_out_format=json)
CASES="D(64|128)/L($LS)/(none|causal|alibi)"
flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
has() { [[ " $flags " == *" $1 "* ]]; }

log() { echo "engines_bench: $*" >&2; }
log "host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores, commit $(git -C "$ROOT" rev-parse --short HEAD)"
export FLEXJIT_CACHE_DIR=$(mktemp -d /tmp/flexjit-engines-XXXXXX)
# A fresh Inductor cache too, so torch.json's first_call_ms are real compiles.
export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d /tmp/flexjit-engines-inductor-XXXXXX)
trap 'rm -rf "$FLEXJIT_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR"' EXIT

files=()
log "prefill, host target, default engines, with SDPA"
"$BENCH/prefill_bench" --benchmark_filter="prefill/(fp32|bf16|fp16)/$CASES/(flexjit|sdpa)" "${AGG[@]}" \
  --benchmark_out="$OUT/prefill-host.json" >/dev/null
files+=("$OUT/prefill-host.json")

if has avx512_bf16 || has amx_bf16; then
  fma_dtypes=bf16
  has amx_bf16 && fma_dtypes='(bf16|fp16)'
  log "prefill $fma_dtypes on the FMA engine (FLEXJIT_AMX=0 FLEXJIT_DPBF16=0)"
  FLEXJIT_AMX=0 FLEXJIT_DPBF16=0 "$BENCH/prefill_bench" --benchmark_filter="prefill/$fma_dtypes/$CASES/flexjit" "${AGG[@]}" \
    --benchmark_out="$OUT/prefill-host-fma.json" >/dev/null
  files+=("$OUT/prefill-host-fma.json")
else
  log "skipped: bf16 on the FMA engine as a separate run (the host has neither AMX-BF16 nor AVX512-BF16: FMA is its default)"
fi

log "prefill, FLEXJIT_CPU_TARGET=x86-64-v3"
FLEXJIT_CPU_TARGET=x86-64-v3 "$BENCH/prefill_bench" --benchmark_filter="prefill/(fp32|bf16)/$CASES/flexjit" "${AGG[@]}" \
  --benchmark_out="$OUT/prefill-v3.json" >/dev/null
files+=("$OUT/prefill-v3.json")

if has avx512f && has avx512bw && has avx512vl && has avx512dq; then
  log "prefill, FLEXJIT_CPU_TARGET=x86-64-v4"
  FLEXJIT_CPU_TARGET=x86-64-v4 "$BENCH/prefill_bench" --benchmark_filter="prefill/(fp32|bf16)/$CASES/flexjit" "${AGG[@]}" \
    --benchmark_out="$OUT/prefill-v4.json" >/dev/null
  files+=("$OUT/prefill-v4.json")
else
  log "skipped: x86-64-v4 (this host has no AVX-512)"
fi

log "torch.compile(flex_attention) on the same prefill cases"
python3 "$ROOT/bench/engines_torch.py" --json "$OUT/torch.json" --reps "$REPS" ${TORCH_FILTER:+--filter "$TORCH_FILTER"}
files+=("$OUT/torch.json")

python3 "$ROOT/scripts/engines_report.py" "${files[@]}" > "$OUT/engines.md"
if [[ "$QUICK" != "--quick" ]]; then
  log "decode, with SDPA"
  "$BENCH/decode_bench" --benchmark_filter='decode/(fp32|bf16)/.*/KV(8192|32768)/(contig|paged)/(flexjit|sdpa)' "${AGG[@]}" \
    --benchmark_out="$OUT/decode.json" >/dev/null
  { echo; echo "## Decode"; echo; python3 "$ROOT/scripts/decode_report.py" "$OUT/decode.json"; } >> "$OUT/engines.md"
fi
log "wrote $OUT/engines.md"
cat "$OUT/engines.md"
