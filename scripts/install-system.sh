#!/usr/bin/env bash
# Debian packages the tests and the server need: redis-server (tests start their own on a
# free port), ffmpeg (torchcodec, used by pyannote.audio, links against its libraries) and
# openssl (the TLS test makes a self-signed certificate; under CI a missing tool fails it).
set -euo pipefail
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v ffmpeg >/dev/null 2>&1 || missing+=(ffmpeg)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
# chromium + chromium-driver: the console's browser tests drive it headless with Selenium
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
command -v sipp >/dev/null 2>&1 || missing+=(sip-tester)  # SIPp: the SIPREC tests' SRC
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
