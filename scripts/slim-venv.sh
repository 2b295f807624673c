#!/usr/bin/env bash
# Remove from an installed runtime venv what serving never loads: the image ships what is left.
#
#   scripts/slim-venv.sh VENV
#
# - scipy and scikit-learn: sentence-transformers (the bundled backbone's package) depends on them
#   for its own evaluators and trainers; adapterserve loads the backbone through transformers and
#   imports neither (about 190 MB);
# - test suites shipped inside wheels (torch/test, every package's tests/), torch's C++ headers,
#   CMake files and test binaries (for building extensions and testing torch itself);
# - pip and setuptools: the image installs nothing at run time.
set -euo pipefail
venv=${1:?usage: $0 VENV}
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$venv/bin/python" -m pip uninstall -q -y scikit-learn scipy
find "$site" -depth -type d \( -name tests -o -name __tests__ \) -prune -exec rm -rf {} +
rm -rf "$site/torch/test" "$site/torch/include" "$site/torch/share/cmake"
find "$site/torch/bin" -type f ! -name torch_shm_manager -delete
"$venv/bin/python" -m pip uninstall -q -y pip setuptools
du -sh "$venv"
