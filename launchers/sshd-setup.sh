#!/bin/sh
# The sshd set-up an image needs for smdist's MPI backend: run once at image build time
# (RUN /opt/smdist/launchers/sshd-setup.sh), as root. Idempotent.
#
# - host keys, and /run/sshd (privilege separation directory)
# - the job's key: one key pair baked into the image, so every container of the job
#   (same image) trusts every other; password logins are off
# - no host-key prompts for the job's hosts (algo-1, algo-2, ...: their keys are new
#   on every job)
# The agent starts sshd itself on hosts that need it (smdist.agent.backends.mpi.ensure_sshd).
set -eu

SSH_DIR="${SMDIST_SSH_DIR:-/root/.ssh}"

mkdir -p /run/sshd /etc/ssh "$SSH_DIR"
chmod 700 "$SSH_DIR"
ssh-keygen -A >/dev/null

if [ ! -f "$SSH_DIR/id_ed25519" ]; then
    ssh-keygen -q -t ed25519 -N "" -C "smdist-job" -f "$SSH_DIR/id_ed25519"
fi
touch "$SSH_DIR/authorized_keys"
grep -qxF "$(cat "$SSH_DIR/id_ed25519.pub")" "$SSH_DIR/authorized_keys" \
    || cat "$SSH_DIR/id_ed25519.pub" >> "$SSH_DIR/authorized_keys"
chmod 600 "$SSH_DIR/authorized_keys"

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
echo "sshd-setup: host keys, the job key ($SSH_DIR/id_ed25519) and sshd/ssh config are in place"
