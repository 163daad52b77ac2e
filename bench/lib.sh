# shellcheck shell=bash disable=SC2154  # the variables below are the caller's
# Shared by bench/run and bench/floor; sourced, with $work, $PROFILE,
# $DURATION, $ORGANIZATIONS, $DATABASE and DATABASE_URL set.

# Builds the binaries, creates the database with the service's schema and
# writes the pgbench scripts; sets $service and $bench.
prepare() {
    cargo build --quiet --profile "$PROFILE" --features bench --bin bench --bin channel-assignment
    local out_dir
    out_dir=target/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")
    service=$out_dir/channel-assignment
    bench=$out_dir/bench
    psql -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS $DATABASE" \
        -c "CREATE DATABASE $DATABASE" >/dev/null
    "$service" migrate 2>/dev/null
    "$bench" pgbench-scripts --out "$work/pgbench"
}

# pgbench with the service's statements and mix (`bench pgbench-scripts`),
# C connections to PORT over TCP, -M prepared like sqlx; extra pgbench
# arguments after SIZE. Runs in $work, so that -l logs land there. The
# statements are those of $workload (as `bench load --workload`): writes (the
# default), reads-get or reads-lookup.
run_pgbench() { # PORT C SIZE [pgbench args...]
    local port=$1 concurrency=$2 size=$3 scripts
    shift 3
    case ${workload:-writes} in
        writes) scripts=(-f pgbench/assign_mailbox.sql@40 -f pgbench/unassign_mailbox.sql@10
                         -f pgbench/assign_phone_number.sql@40 -f pgbench/unassign_phone_number.sql@10) ;;
        reads-get) scripts=(-f pgbench/get_identity.sql) ;;
        reads-lookup) scripts=(-f pgbench/lookup_identity_by_email_address.sql) ;;
        *) echo "unknown workload: $workload" >&2; return 1 ;;
    esac
    (cd "$work" && pgbench -h 127.0.0.1 -p "$port" -U postgres -n -M prepared \
        -c "$concurrency" -j 2 -T "$DURATION" "$@" \
        -D n="$size" -D k="$ORGANIZATIONS" -D not_found=50 -D conflict=100 \
        "${scripts[@]}" "$DATABASE" 2>&1)
}

# The CPU a `times` line (its second: children's user and system) reports, in seconds.
times_seconds() {
    tail -1 | tr 'ms' '  ' | awk '{ print $1 * 60 + $2 + $3 * 60 + $4 }'
}

# /proc/PID/stat: utime + stime, in seconds.
cpu_seconds() { awk '{ print ($14 + $15) / 100 }' "/proc/$1/stat"; }
