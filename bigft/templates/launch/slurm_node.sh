#!/usr/bin/env bash
# Per-node entry point of a bigft Slurm job.
#
# The sbatch script runs `srun --ntasks-per-node=1 bash slurm_node.sh`, so ONE copy of
# this script runs on EVERY node of the allocation, and it starts that node's training
# processes. Everything that differs between nodes (node rank, GPUs, whether this node
# hosts the rendezvous) is read HERE, at run time, on the node itself. Computing it in
# the batch script instead is the classic bug: the batch shell runs only on the first
# node, so `$SLURM_NODEID` would be 0 everywhere and every node would claim rank 0.
#
# Inputs (exported by the sbatch script that bigft renders; see slurm/job.sbatch.j2):
#   BIGFT_CONFIG             resolved bigft config to train
#   BIGFT_PYTHON             interpreter that has bigft installed
#   BIGFT_LAUNCHER           torchrun | accelerate
#   BIGFT_NPROC_PER_NODE     optional: processes per node (default: GPUs on this node)
#   BIGFT_MASTER_PORT        optional: rendezvous port (default: 20000 + job id % 20000)
#   BIGFT_RDZV_TIMEOUT       seconds nodes wait for each other at start
#   BIGFT_ACCELERATE_CONFIG  optional: accelerate config file (DeepSpeed / FSDP)
#   BIGFT_EXIT_DIR           optional: folder where this node records how its launcher ended
set -euo pipefail

log() { echo "[bigft node ${SLURM_NODEID:-?}] $*" >&2; }

# Ignore the preemption signal in this shell and in the launcher it execs: Slurm sends
# USR1 to every process of the job step, and the default action of USR1 is to die.
# The training processes install their own handler (checkpoint, then stop), which
# replaces the inherited "ignore".
trap '' USR1

: "${SLURM_JOB_ID:?this script runs inside a Slurm job, under srun}"
: "${SLURM_NODEID:?this script must be started by srun (SLURM_NODEID is unset)}"
: "${BIGFT_CONFIG:?BIGFT_CONFIG is not set}"
python="${BIGFT_PYTHON:-python3}"

# Node rank: this node's index in the allocation, evaluated here on each node.
node_rank="$SLURM_NODEID"
nnodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"

# Rendezvous host: the first node of the allocation (node rank 0).
mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
master_addr="${MASTER_ADDR:-${hosts[0]}}"
master_port="${BIGFT_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
this_node="${SLURMD_NODENAME:-${hosts[$node_rank]}}"
if [[ "${hosts[$node_rank]}" != "$this_node" ]]; then
    log "warning: SLURM_NODEID $node_rank names ${hosts[$node_rank]}, but this is $this_node"
fi
# This node hosts the rendezvous store when it is the rendezvous host. Said explicitly
# rather than guessed from host names (which fails with several network interfaces).
if [[ "$this_node" == "$master_addr" ]]; then is_host=true; else is_host=false; fi

# Processes on this node: what was asked, else the GPUs Slurm gave this node.
count_list() { local IFS=,; set -- $1; echo $#; }
if [[ -n "${BIGFT_NPROC_PER_NODE:-}" ]]; then
    nproc="$BIGFT_NPROC_PER_NODE"
elif [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
    nproc="$SLURM_GPUS_ON_NODE"
elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    nproc="$(count_list "$CUDA_VISIBLE_DEVICES")"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    nproc="$(nvidia-smi -L | grep -c '^GPU')"
else
    nproc=1
fi

export MASTER_ADDR="$master_addr" MASTER_PORT="$master_port" NODE_RANK="$node_rank"
# `python -m` puts the working directory (where the job was submitted) first on sys.path,
# so a folder named bigft or torch there (a checkout's parent, a stale copy) would replace
# the installed package in the launcher and in every training process it starts, which
# inherit this variable. Python 3.11+ leaves the working directory out under it.
export PYTHONSAFEPATH=1
log "$this_node: node $node_rank of $nnodes, $nproc process(es), rendezvous" \
    "$master_addr:$master_port (host: $is_host), restart ${SLURM_RESTART_COUNT:-0}"

# How this node's launcher ended: "<time> <status> <node rank>" in $BIGFT_EXIT_DIR. When one
# node fails, srun stops the others with a signal and reports *their* status (143); the
# batch script reads these records to name the node that failed first and its status.
record_exit() {
    local status=$?
    if [[ -n "${BIGFT_EXIT_DIR:-}" ]]; then
        echo "$(date +%s.%N) $status $node_rank" > "$BIGFT_EXIT_DIR/node-$node_rank" || true
    fi
    exit "$status"
}
trap record_exit EXIT

case "${BIGFT_LAUNCHER:-torchrun}" in
torchrun)
    # c10d rendezvous: nodes meet at the store on node 0; --max-restarts 0 because
    # restarts are Slurm's job (requeue), not torchrun's.
    "$python" -m torch.distributed.run \
        --nnodes "$nnodes" --nproc-per-node "$nproc" \
        --rdzv-backend c10d --rdzv-endpoint "$master_addr:$master_port" \
        --rdzv-id "$SLURM_JOB_ID" \
        --rdzv-conf "is_host=$is_host,join_timeout=${BIGFT_RDZV_TIMEOUT:-900}" \
        --max-restarts 0 \
        -m bigft train "$BIGFT_CONFIG"
    ;;
accelerate)
    # accelerate's static rendezvous: machine_rank must be this node's rank, and rank 0
    # must be the node at main_process_ip -- both hold by construction above.
    args=(--num_machines "$nnodes" --num_processes "$((nnodes * nproc))"
          --machine_rank "$node_rank" --main_process_ip "$master_addr"
          --main_process_port "$master_port" --same_network --max_restarts 0)
    if [[ -n "${BIGFT_ACCELERATE_CONFIG:-}" ]]; then
        args=(--config_file "$BIGFT_ACCELERATE_CONFIG" "${args[@]}")
    else
        args=(--multi_gpu "${args[@]}")
    fi
    "$python" -m accelerate.commands.launch "${args[@]}" -m bigft train "$BIGFT_CONFIG"
    ;;
*)
    log "unknown BIGFT_LAUNCHER '${BIGFT_LAUNCHER}' (expected torchrun or accelerate)"
    exit 2
    ;;
esac
