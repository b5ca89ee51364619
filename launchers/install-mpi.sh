#!/bin/sh
# Open MPI and OpenSSH from Debian's packages, for smdist's MPI backend (issue 9).
# Idempotent: apt-get runs only when something is missing. Needs root (or sudo).
set -eu

missing=""
command -v mpirun >/dev/null 2>&1 || missing="$missing openmpi-bin"
[ -n "$(ls -d /usr/lib/*/openmpi/include 2>/dev/null)" ] || missing="$missing libopenmpi-dev"
[ -x /usr/sbin/sshd ] || missing="$missing openssh-server"
command -v ssh >/dev/null 2>&1 || missing="$missing openssh-client"

if [ -z "$missing" ]; then
    echo "install-mpi: Open MPI and OpenSSH already installed ($(mpirun --version 2>/dev/null | head -n 1))"
    exit 0
fi

SUDO=""
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || {
        echo "install-mpi: need root to install:$missing" >&2
        exit 1
    }
    SUDO="sudo"
fi
echo "install-mpi: installing$missing"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing
