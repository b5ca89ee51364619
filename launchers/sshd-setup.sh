#!/bin/sh
# The sshd set-up an image needs for smdist's MPI backend: run once at image build time
# (RUN /opt/smdist/launchers/sshd-setup.sh), as root. Idempotent.
#
# - host keys, and /run/sshd (privilege separation directory)
# - no key is trusted: smdist makes a fresh key pair for every job, hands the public key to
#   the job's hosts through its authenticated store, and each host's agent starts an sshd
#   of its own for the job that accepts that key only (docs/security.md). A key baked into
#   the image would let any container of the image into any host.
# - no host-key prompts for the job's hosts (algo-1, algo-2, ...: their keys are new
#   on every job)
#
# Opt-out (docs/mpi.md): SMDIST_SSH_IMAGE_KEY=1 bakes one key pair into the image and
# trusts it, as smdist did before per-job keys; only with SMDIST_SSH_JOB_KEY=0 at run time
# (then the agent uses any sshd on the port), and any container of the image can log in.
set -eu

SSH_DIR="${SMDIST_SSH_DIR:-/root/.ssh}"

mkdir -p /run/sshd /etc/ssh "$SSH_DIR"
chmod 700 "$SSH_DIR"
ssh-keygen -A >/dev/null

if [ "${SMDIST_SSH_IMAGE_KEY:-0}" = 1 ]; then
    if [ ! -f "$SSH_DIR/id_ed25519" ]; then
        ssh-keygen -q -t ed25519 -N "" -C "smdist-image" -f "$SSH_DIR/id_ed25519"
    fi
    touch "$SSH_DIR/authorized_keys"
    grep -qxF "$(cat "$SSH_DIR/id_ed25519.pub")" "$SSH_DIR/authorized_keys" \
        || cat "$SSH_DIR/id_ed25519.pub" >> "$SSH_DIR/authorized_keys"
    chmod 600 "$SSH_DIR/authorized_keys"
    KEY="the image key $SSH_DIR/id_ed25519 (SMDIST_SSH_IMAGE_KEY=1: any container of the image can log in)"
else
    KEY="no trusted key (smdist makes one per job)"
fi

# sshd: keys only; root may log in with a key (SageMaker containers run as root).
CONF=/etc/ssh/sshd_config.d/smdist.conf
mkdir -p /etc/ssh/sshd_config.d
cat > "$CONF" <<'CONF'
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
UseDNS no
CONF
grep -q '^Include /etc/ssh/sshd_config.d/' /etc/ssh/sshd_config 2>/dev/null \
    || sed -i '1i Include /etc/ssh/sshd_config.d/*.conf' /etc/ssh/sshd_config

# ssh by hand (debugging): the job's hosts get fresh host keys on every job; don't ask,
# don't remember. (mpirun gets these options from smdist itself, for addresses too.)
cat > "$SSH_DIR/config" <<'CONF'
Host algo-* localhost 127.0.0.1
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
    BatchMode yes
CONF
chmod 600 "$SSH_DIR/config"
echo "sshd-setup: host keys, sshd/ssh config and $KEY are in place"
