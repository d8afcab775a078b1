#!/usr/bin/env bash
# Transformer Engine on the GPU machine, which has no internet: the core wheel travels in parts
# (each device call carries <= 64 MiB in all), the PyTorch extension is built there.
#
#   bash scripts/te_install.sh prepare   # here (internet): download, recompress, split into .te/1 .. .te/M
#   bash scripts/te_install.sh N         # on the GPU machine, device call N of M, back to back
#                                        # (each call carries .te/N; /tmp survives while the machine is warm)
#
# What and why (docs/backend.md, "Transformer Engine"):
# * transformer-engine 2.12.0: the newest release whose cu13 core library resolves against the
#   cuBLAS of torch 2.11's CUDA 13.0 stack (nvidia-cublas 13.1.0.3). From 2.13 on the core library
#   needs cublasLtGroupedMatrixLayoutInit_internal (cuBLAS >= 13.2), and import fails with an
#   undefined symbol. 2.12 works with megatron-core 0.19.2 (its TE checks go up to 2.14 and only
#   gate optional features).
# * transformer_engine_cu13-2.12.0 (core, 181 MiB on PyPI) is re-zipped uncompressed and xz'd
#   (~137 MiB, same files and RECORD) and split into parts of at most PART_MIB (default 48) MiB:
#   the repository (~4 MiB) travels with every call.
# * transformer_engine-2.12.0 (metapackage; TE's import checks that all three versions match),
#   transformer_engine_torch-2.12.0 (sdist: a C++-only torch extension, 28 files, built with
#   MAX_JOBS=16 against the installed torch, no build isolation), pydantic (TE's recipes import
#   it; not on the image) with pydantic-core, annotated-types, typing-inspection, typing-extensions.
# * Headers for the extension come from the image's CUDA toolkit and torch's CUDA wheels
#   (nvidia/cu13/include, nvidia/cudnn/include, nvidia/nccl/include): found below, one line each.
# Installed with pip --target into TE_SITE (default /tmp/te_site): use PYTHONPATH=$TE_SITE:...
# The last call prints one line "TE_INSTALL OK ..." (or "TE_INSTALL FAILED: ..." and exits 1).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TE_VERSION=${TE_VERSION:-2.12.0}
PART_MIB=${PART_MIB:-48}
TE_DIR=.te
STAGE=${TE_STAGE:-/tmp/te_stage}
TE_SITE=${TE_SITE:-/tmp/te_site}
PY=${PYTHON:-python3}
CORE=transformer_engine_cu13-${TE_VERSION}-py3-none-manylinux_2_28_x86_64.whl

fail() { echo "TE_INSTALL FAILED: $*"; exit 1; }

prepare() {
  local dl=$TE_DIR/dl
  mkdir -p "$dl"
  grep -qx '/.te/' "$(git rev-parse --git-common-dir)/info/exclude" 2>/dev/null \
    || echo '/.te/' >> "$(git rev-parse --git-common-dir)/info/exclude"
  local pipdl=("$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
               --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dl")
  "${pipdl[@]}" "transformer-engine-cu13==$TE_VERSION" "transformer-engine==$TE_VERSION" \
    "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5" \
    "typing-extensions==4.16.0"
  # the sdist straight from the index: `pip download` would prepare its metadata, which needs torch
  local href
  href=$(curl -fsSL https://pypi.org/simple/transformer-engine-torch/ \
         | grep -o "href=\"[^\"]*transformer_engine_torch-$TE_VERSION.tar.gz#sha256=[0-9a-f]*\"" | head -1 | sed 's/^href="//; s/"$//')
  [ -n "$href" ] || fail "transformer_engine_torch-$TE_VERSION.tar.gz not found on pypi.org/simple"
  curl -fsSL -o "$dl/transformer_engine_torch-$TE_VERSION.tar.gz" "${href%%#*}"
  echo "${href##*sha256=}  $dl/transformer_engine_torch-$TE_VERSION.tar.gz" | sha256sum -c --quiet - \
    || fail "sha256 of transformer_engine_torch-$TE_VERSION.tar.gz"
  # uncompressed zip (same members, same RECORD) so that xz sees the raw library
  "$PY" - "$dl/$CORE" "$dl/stored.whl" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as zin, zipfile.ZipFile(sys.argv[2], "w", zipfile.ZIP_STORED) as zout:
    for info in zin.infolist():
        out = zipfile.ZipInfo(info.filename, date_time=info.date_time)
        out.external_attr = info.external_attr
        zout.writestr(out, zin.read(info))
EOF
  xz -6 -T2 -c "$dl/stored.whl" > "$dl/core.whl.xz"
  rm -rf "$TE_DIR"/[0-9]*
  split -b "${PART_MIB}M" -d -a 1 "$dl/core.whl.xz" "$dl/core.whl.xz.part"
  local parts=("$dl"/core.whl.xz.part*) n=0
  local m=${#parts[@]}
  (cd "$dl" && sha256sum core.whl.xz.part* stored.whl > SHA256SUMS)
  for p in "${parts[@]}"; do
    n=$((n + 1)); mkdir -p "$TE_DIR/$n"; cp "$p" "$dl/SHA256SUMS" "$TE_DIR/$n/"
  done
  cp "$dl"/transformer_engine-"$TE_VERSION"-*.whl "$dl"/transformer_engine_torch-"$TE_VERSION".tar.gz \
     "$dl"/pydantic*.whl "$dl"/annotated_types-*.whl "$dl"/typing_inspection-*.whl "$dl"/typing_extensions-*.whl "$TE_DIR/$m/"
  echo "$CORE" > "$TE_DIR/$m/LAST"
  du -sh "$TE_DIR"/[0-9]*
  echo "prepared $m device calls: bash scripts/te_install.sh 1 .. $m (carry .te/N in call N)"
}

# ----------------------------------------------------------------------------------- on the GPU
stage() {  # copy this call's part(s) out of the working tree into /tmp, which outlives the call
  local n=$1
  [ -d "$TE_DIR/$n" ] || fail "$TE_DIR/$n is not here: carry it (run: carry=[\"$TE_DIR/$n\"])"
  mkdir -p "$STAGE"
  cp "$TE_DIR/$n"/* "$STAGE/"
  (cd "$STAGE" && for f in "$OLDPWD/$TE_DIR/$n"/core.whl.xz.part*; do
     grep " $(basename "$f")\$" SHA256SUMS | sha256sum -c --quiet - || fail "checksum of $(basename "$f")"; done)
  echo "call $n: staged $(ls "$TE_DIR/$n" | tr '\n' ' ')in $STAGE ($(du -sh "$STAGE" | cut -f1) there)"
}

header_dirs() {  # one directory per header the extension needs, from the toolkit and torch's CUDA wheels
  "$PY" - "$CUDA_HOME" <<'EOF'
import glob, os, sys, torch
site = os.path.dirname(os.path.dirname(torch.__file__))
roots = [os.path.join(sys.argv[1], "include"), os.path.join(sys.argv[1], "targets", "x86_64-linux", "include"),
         os.path.join(site, "nvidia", "cu13", "include")] + sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
roots = [d for r in roots for d in (r, os.path.join(r, "cccl")) if os.path.isdir(d)]
need = ["cuda_runtime.h", "cuda.h", "crt/host_defines.h", "nv/target", "cublasLt.h", "cublas_v2.h", "cusparse.h",
        "nvrtc.h", "nvtx3/nvToolsExt.h", "cudnn.h", "nccl.h"]
optional = ["cusolverDn.h", "curand.h"]  # in torch's CUDA headers' reach; the compiler says if one is needed
dirs, missing = [], []
for h in need + optional:
    hit = next((r for r in roots if os.path.exists(os.path.join(r, h))), None)
    print(f"  header {h:22s} {hit or ('NOT FOUND' + (' (optional)' if h in optional else ''))}", file=sys.stderr)
    if hit is None and h in need:
        missing.append(h)
    elif hit is not None and hit not in dirs:
        dirs.append(hit)
if missing:
    sys.exit(f"headers not found: {missing} (searched {roots})")
print(":".join(dirs))
EOF
}

install_last() {
  local t0=$SECONDS
  local expect
  expect=$(grep -c 'core.whl.xz.part' "$STAGE/SHA256SUMS")
  core_ok() { [ -f "$STAGE/$CORE" ] && (cd "$STAGE" && sed -n "s/ stored.whl\$/ $CORE/p" SHA256SUMS | sha256sum -c --quiet -); }
  if core_ok; then  # a repeated last call on a warm machine (e.g. after a failed build): parts 1..M-1 not needed
    echo "core wheel already reassembled in $STAGE"
  else
    for p in $(awk '/core.whl.xz.part/ {print $2}' "$STAGE/SHA256SUMS"); do
      [ -f "$STAGE/$p" ] || fail "$p is missing in $STAGE: the machine went back between calls; run calls 1..$expect again back to back"
    done
    cat "$STAGE"/core.whl.xz.part* | "$PY" -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer, 1 << 24)" \
      > "$STAGE/$CORE"
    core_ok || fail "checksum of the reassembled $CORE"
    rm -f "$STAGE"/core.whl.xz.part*
    echo "core wheel reassembled ($(du -h "$STAGE/$CORE" | cut -f1), $((SECONDS - t0)) s)"
  fi

  command -v g++ > /dev/null || fail "no g++ on this machine (the torch extension is C++)"
  CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")}
  export CUDA_HOME
  local inc
  inc=$(header_dirs) || fail "headers for the torch extension (see the lines above)"
  export CPLUS_INCLUDE_PATH=$inc${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}
  export NVTE_PYTORCH_FORCE_BUILD=TRUE NVTE_NO_LOCAL_VERSION=1 NVTE_FRAMEWORK=pytorch MAX_JOBS=${MAX_JOBS:-16}
  rm -rf "$STAGE/src" "$STAGE/wheels"
  mkdir -p "$STAGE/src" "$STAGE/wheels"
  tar xzf "$STAGE/transformer_engine_torch-$TE_VERSION.tar.gz" -C "$STAGE/src"
  local tb=$SECONDS log=${OUT:-$STAGE}/te_build.log
  echo "building transformer_engine_torch $TE_VERSION (MAX_JOBS=$MAX_JOBS, g++ $(g++ -dumpversion), CUDA_HOME=$CUDA_HOME; log $log)"
  if ! "$PY" -m pip wheel -v --no-build-isolation --no-deps --no-index -w "$STAGE/wheels" \
       "$STAGE/src/transformer_engine_torch-$TE_VERSION" > "$log" 2>&1; then
    grep -E "error|Error" "$log" | head -20
    tail -20 "$log"
    fail "building transformer_engine_torch (log: $log)"
  fi
  local build_s=$((SECONDS - tb))
  echo "built $(ls "$STAGE/wheels") in $build_s s"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$TE_SITE" \
    "$STAGE/$CORE" "$STAGE"/transformer_engine-"$TE_VERSION"-*.whl "$STAGE"/wheels/*.whl "$STAGE"/pydantic*.whl \
    "$STAGE"/annotated_types-*.whl "$STAGE"/typing_inspection-*.whl "$STAGE"/typing_extensions-*.whl \
    || fail "pip install into $TE_SITE"
  PYTHONPATH=$TE_SITE${PYTHONPATH:+:$PYTHONPATH} BUILD_S=$build_s TOTAL_S=$((SECONDS - t0)) "$PY" - <<'EOF' || fail "import test (above)"
import os, time, warnings
warnings.filterwarnings("ignore")
import torch
t = time.time()
import transformer_engine
import transformer_engine.pytorch as te
from transformer_engine.common.recipe import DelayedScaling
import transformer_engine_torch  # noqa: F401  (the extension built here)
dev, bf = "cuda", torch.bfloat16
torch.manual_seed(0)
x = torch.randn(64, 256, device=dev, dtype=bf, requires_grad=True)
lin = te.Linear(256, 512, bias=False, params_dtype=bf, device=dev)
y = lin(x)
y.float().square().mean().backward()
ref = x.detach().float() @ lin.weight.detach().float().t()
lin_err = ((y.float() - ref).norm() / ref.norm()).item()
with te.fp8_autocast(enabled=True, fp8_recipe=DelayedScaling()):
    y8 = lin(x)
fp8_err = ((y8.float() - ref).norm() / ref.norm()).item()
q, k, v = (torch.randn(128, 2, 8, 64, device=dev, dtype=bf) for _ in range(3))  # [s, b, h, d]
dpa = te.DotProductAttention(8, 64, attn_mask_type="causal", qkv_format="sbhd")
o = dpa(q, k, v).float()
sd = torch.nn.functional.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3).float() for t in (q, k, v)), is_causal=True)
attn_err = ((o - sd.permute(2, 0, 1, 3).reshape(o.shape)).norm() / sd.norm()).item()
try:
    from megatron.core.extensions.transformer_engine import HAVE_TE
    mcore = f"megatron.core HAVE_TE={HAVE_TE}"
except Exception as exc:  # megatron-core is installed by another step (/tmp/site); not needed here
    mcore = f"megatron.core not importable here ({type(exc).__name__})"
ok = lin_err < 1e-2 and fp8_err < 0.1 and attn_err < 2e-2 and y.grad_fn is not None and x.grad is not None
print(f"TE_INSTALL {'OK' if ok else 'FAILED'} te={transformer_engine.__version__} torch={torch.__version__} "
      f"device={torch.cuda.get_device_name()} build={os.environ['BUILD_S']}s total={os.environ['TOTAL_S']}s "
      f"import={time.time() - t:.1f}s linear_rel_err={lin_err:.1e} fp8_linear_rel_err={fp8_err:.1e} "
      f"dpa_vs_sdpa_rel_err={attn_err:.1e} {mcore} site={os.environ['PYTHONPATH'].split(':')[0]}")
raise SystemExit(0 if ok else 1)
EOF
}

case "${1:-}" in
  prepare) prepare ;;
  [0-9]*)
    stage "$1"
    if [ -f "$TE_DIR/$1/LAST" ]; then install_last; else echo "call $1 done: run call $(( $1 + 1 )) now (this machine stays warm ~30 s)"; fi ;;
  *) echo "usage: bash scripts/te_install.sh prepare | N" >&2; exit 2 ;;
esac
