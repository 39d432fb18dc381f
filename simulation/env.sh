# Source this before using the `flwr` CLI by hand:  source simulation/env.sh
# - FLWR_HOME in the repository (.flwr/, git-ignored) so `flwr` never touches ~/.flwr,
# - no dependency installation at run time (no network; the app uses the installed flowerbed),
# - federations: local-sim (10 CPU clients), local-sim-gpu (0.25 GPU each), deploy (a SuperLink).
_fb_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export FLWR_HOME="$_fb_root/.flwr"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_TELEMETRY_ENABLED=0
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
mkdir -p "$FLWR_HOME"
[ -f "$FLWR_HOME/config.toml" ] || cp "$_fb_root/simulation/flwr-config.toml" "$FLWR_HOME/config.toml"
[ -d "$_fb_root/.venv/bin" ] && export PATH="$_fb_root/.venv/bin:$PATH"
unset _fb_root
