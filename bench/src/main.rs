//! `consul-lock-bench`: runs the benchmark suite against a Consul agent it starts, prints a table
//! and writes the results as JSON. See `bench/README.md`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use consul_lock_bench::contender;
use consul_lock_bench::error::BenchError;
use consul_lock_bench::host::{ClientKind, Launcher};
use consul_lock_bench::lab::{self, FaultKind, LabPlan};
use consul_lock_bench::operator::Operator;
use consul_lock_bench::report::{Machine, Results};
use consul_lock_bench::scenarios::{self, Ctx, Plan};
use consul_lock_testkit::agent::ConsulAgent;

const USAGE: &str = "\
consul-lock-bench: the tokio and blocking drivers side by side with HashiCorp's Go client

usage: consul-lock-bench [--smoke] [--only LIST] [--clients LIST] [--out FILE] [--go-bin FILE]
                         [--scale-sizes LIST] [--scale-window SECS] [--scale-default-only]
                         [--contention-sizes LIST]
                         [--keyset-size N]

  --smoke         every scenario, small: proves the suite runs (CI); its figures mean little
  --only LIST     scenarios, comma-separated: handoff,failover,partition,contention,idle,core,scale
  --clients LIST  clients, comma-separated: tokio,blocking,go,queued (default: all four;
                  queued is the tokio driver waiting in line, Waiting::Queue)
  --out FILE      where the JSON goes (default: target/consul-lock-bench/<plan>.json)
  --go-bin FILE   the Go contender (default: $GO_CONTENDER_BIN, else scripts/ensure-go-contender.sh builds it)
  --contention-sizes LIST  contender counts of the contention scenario, comma-separated (default: 20,50)
  --scale-sizes LIST     lock counts of the scale scenario, comma-separated (default: 100,1000);
                         the largest also runs at Consul's default connection limit
  --scale-window SECS    how long the scale scenario holds the locks idle, counting losses (default: 20)
  --scale-default-only   the scale scenario only at Consul's default connection limit
  --keyset-size N        keys held on one session by the scale scenario's key set run, at the
                         default connection limit (tokio; default: 10000; 0: no key set run)

The agent: consul from $CONSUL_BIN, else PATH, else scripts/ensure-consul.sh (Consul 1.8.7).

The reliability lab (RELIABILITY.md), as root, in a network namespace of its own:

  unshare --net --pid --fork --kill-child consul-lock-bench lab [--short | --minutes N]
          [--faults LIST] [--clients LIST] [--ttl SECS] [--lock-delay SECS]
          [--out FILE] [--dir DIR] [--go-bin FILE]
  unshare --net --pid --fork --kill-child consul-lock-bench lab --check-cluster [--dir DIR]

  --short          the four faults CI runs, once each (about 3 minutes of faults)
  --minutes N      every fault kind in turn for N minutes (default: 30)
  --faults LIST    fault kinds, comma-separated: isolate-leader,cut-client,pause-client,kill-leader,
                   leader-one-way,split-leader-minority,split-follower-minority,pause-leader,
                   kill-client,election
  --ttl SECS        the session TTL (default: 10)
  --lock-delay SECS the session lock-delay (default: 10; below the TTL, overlaps become possible)
  --out FILE       where the JSON goes (default: target/consul-lock-bench/lab.json)
  --dir DIR        the agents' data directories and logs (default: a new temporary directory)
  --check-cluster  start the cluster, isolate its leader, see another elected, heal, stop
";

const SCENARIOS: [&str; 7] = [
    "handoff",
    "failover",
    "partition",
    "contention",
    "idle",
    "core",
    "scale",
];

/// Counts heap allocations for the core's figures. It is the allocator of the Rust contenders too
/// (they are this program): a relaxed atomic add per allocation, nanoseconds against the
/// milliseconds they are measured in.
#[global_allocator]
static ALLOC: consul_lock_bench::alloc_count::CountingAlloc = consul_lock_bench::alloc_count::CountingAlloc;

struct Args {
    plan: Plan,
    only: Vec<String>,
    clients: Vec<ClientKind>,
    out: Option<PathBuf>,
    go_bin: Option<PathBuf>,
}

fn parse_args(args: &[String]) -> Result<Args, BenchError> {
    let mut parsed = Args {
        plan: Plan::full(),
        only: SCENARIOS.iter().map(|s| (*s).to_owned()).collect(),
        clients: ClientKind::ALL.to_vec(),
        out: None,
        go_bin: std::env::var_os("GO_CONTENDER_BIN").map(PathBuf::from),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| BenchError::Usage(format!("{name} needs a value")))
        };
        match arg.as_str() {
            "--smoke" => parsed.plan = Plan::smoke(),
            "--only" => {
                let list = value("--only")?;
                parsed.only = list.split(',').map(str::to_owned).collect();
                if let Some(bad) = parsed.only.iter().find(|s| !SCENARIOS.contains(&s.as_str())) {
                    return Err(BenchError::Usage(format!(
                        "no scenario {bad:?}; there are {}",
                        SCENARIOS.join(", ")
                    )));
                }
            }
            "--clients" => {
                let list = value("--clients")?;
                parsed.clients = list
                    .split(',')
                    .map(|name| {
                        ClientKind::parse(name).ok_or_else(|| {
                            BenchError::Usage(format!("no client {name:?}; there are tokio, blocking, go"))
                        })
                    })
                    .collect::<Result<_, _>>()?;
            }
            "--scale-sizes" => parsed.plan.scale_sizes = counts("--scale-sizes", &value("--scale-sizes")?)?,
            "--contention-sizes" => {
                parsed.plan.contention_sizes = counts("--contention-sizes", &value("--contention-sizes")?)?;
            }
            "--scale-window" => {
                let secs = value("--scale-window")?;
                let secs = secs.parse::<u64>().ok().filter(|&s| s > 0).ok_or_else(|| {
                    BenchError::Usage(format!("--scale-window: {secs:?} is not a number of seconds"))
                })?;
                parsed.plan.scale_window = Duration::from_secs(secs);
            }
            "--scale-default-only" => parsed.plan.scale_raised = false,
            "--keyset-size" => {
                let n = value("--keyset-size")?;
                let n: usize = n
                    .parse()
                    .map_err(|_| BenchError::Usage(format!("--keyset-size: {n:?} is not a key count")))?;
                parsed.plan.keyset_size = (n > 0).then_some(n);
            }
            "--out" => parsed.out = Some(PathBuf::from(value("--out")?)),
            "--go-bin" => parsed.go_bin = Some(PathBuf::from(value("--go-bin")?)),
            other => return Err(BenchError::Usage(format!("unknown argument {other:?}"))),
        }
    }
    Ok(parsed)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = match args.first().map(String::as_str) {
        Some("contender") => match args.get(1).map(String::as_str) {
            Some("tokio") => contender::run_tokio().map_err(|e| e.to_string()),
            Some("blocking") => contender::run_blocking().map_err(|e| e.to_string()),
            _ => Err("usage: consul-lock-bench contender tokio|blocking".to_owned()),
        },
        Some("lab") => run_lab(&args[1..]).map_err(|e| e.to_string()),
        Some("-h" | "--help") => {
            print!("{USAGE}");
            Ok(())
        }
        _ => parse_args(&args).and_then(run).map_err(|e| e.to_string()),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("consul-lock-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The repository root (the suite runs from a checkout: it builds the Go contender from it).
fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(args: Args) -> Result<(), BenchError> {
    let io = |what: &str| {
        let what = what.to_owned();
        move |source| BenchError::Io { what, source }
    };
    let mut clients = args.clients.clone();
    let go = if clients.contains(&ClientKind::Go) {
        match go_contender(args.go_bin.clone()) {
            Ok(path) => Some(path),
            Err(e) if std::env::var_os("CI").is_none() => {
                eprintln!("consul-lock-bench: leaving Go out: {e}");
                clients.retain(|k| *k != ClientKind::Go);
                None
            }
            Err(e) => return Err(e),
        }
    } else {
        None
    };
    let launcher = Launcher {
        own_exe: std::env::current_exe().map_err(io("finding this program"))?,
        go,
    };
    let agent = ConsulAgent::start()?;
    let operator = Operator::new(agent.config()?)?;
    let started_unix_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let ctx = Ctx {
        agent: &agent,
        launcher: &launcher,
        plan: &args.plan,
        operator: &operator,
        clients: &clients,
        run_tag: format!("{started_unix_s}-{}", std::process::id()),
    };
    let mut results = Results {
        plan: args.plan.clone(),
        machine: machine(&agent),
        started_unix_s,
        clients: clients.clone(),
        handoff: None,
        failover: None,
        partition: None,
        contention: None,
        idle: None,
        scale: None,
        core: None,
    };
    let wanted = |name: &str| args.only.iter().any(|s| s == name);
    let step = |name: &str| {
        eprintln!(
            "consul-lock-bench: {name} ({} plan, clients {:?})",
            args.plan.name,
            clients.iter().map(|c| c.name()).collect::<Vec<_>>()
        )
    };
    if wanted("handoff") {
        step("handoff");
        results.handoff = Some(scenarios::handoff::run(&ctx)?);
    }
    if wanted("failover") {
        step("failover");
        results.failover = Some(scenarios::failover::run(&ctx)?);
    }
    if wanted("partition") {
        step("partition");
        results.partition = Some(scenarios::partition::run(&ctx)?);
    }
    if wanted("contention") {
        step("contention");
        results.contention = Some(scenarios::contention::run(&ctx)?);
    }
    if wanted("idle") {
        step("idle");
        results.idle = Some(scenarios::idle::run(&ctx)?);
    }
    if wanted("core") {
        step("core");
        let figures = consul_lock_bench::core_cycle::measure(args.plan.core_budget).map_err(|e| {
            BenchError::Request {
                what: "the core benchmark",
                msg: e.to_string(),
            }
        })?;
        results.core = Some(figures);
    }
    if wanted("scale") {
        step("scale");
        results.scale = Some(scenarios::scale::run(&ctx)?);
    }
    let out = args.out.unwrap_or_else(|| {
        repo_root()
            .join("target")
            .join("consul-lock-bench")
            .join(format!("{}.json", args.plan.name))
    });
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(io("creating the results directory"))?;
    }
    let json = serde_json::to_string_pretty(&results).map_err(|e| BenchError::Io {
        what: "encoding the results".to_owned(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(&out, json).map_err(io("writing the results"))?;
    if let Some(handoff) = &results.handoff {
        let chart = out.with_extension("handoff.svg");
        std::fs::write(&chart, consul_lock_bench::report::handoff_svg(handoff))
            .map_err(io("writing the handoff chart"))?;
    }
    print!("{}", results.table());
    println!("\nresults: {}", out.display());
    Ok(())
}

/// `consul-lock-bench lab ...`: the reliability lab (see `USAGE` and `bench/src/lab.rs`).
fn run_lab(args: &[String]) -> Result<(), BenchError> {
    let usage = |msg: String| BenchError::Usage(msg);
    let mut minutes: Option<u64> = None;
    let mut short = false;
    let mut check_cluster = false;
    let mut faults: Option<Vec<FaultKind>> = None;
    let mut clients = ClientKind::ALL.to_vec();
    let mut out = None;
    let mut dir = None;
    let mut go_bin = std::env::var_os("GO_CONTENDER_BIN").map(PathBuf::from);
    let mut ttl = None;
    let mut lock_delay = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| usage(format!("{name} needs a value")))
        };
        match arg.as_str() {
            "--short" => short = true,
            "--check-cluster" => check_cluster = true,
            "--minutes" => {
                let v = value("--minutes")?;
                minutes = Some(
                    v.parse()
                        .ok()
                        .filter(|&m| m > 0)
                        .ok_or_else(|| usage(format!("--minutes: {v:?}")))?,
                );
            }
            "--faults" => {
                let list = value("--faults")?;
                faults = Some(
                    list.split(',')
                        .map(|n| FaultKind::parse(n).ok_or_else(|| usage(format!("no fault kind {n:?}"))))
                        .collect::<Result<_, _>>()?,
                );
            }
            "--clients" => {
                let list = value("--clients")?;
                clients = list
                    .split(',')
                    .map(|n| ClientKind::parse(n).ok_or_else(|| usage(format!("no client {n:?}"))))
                    .collect::<Result<_, _>>()?;
            }
            "--ttl" | "--lock-delay" => {
                let v = value(arg)?;
                let secs: u64 = v
                    .parse()
                    .map_err(|_| usage(format!("{arg}: {v:?} is not a number of seconds")))?;
                if arg == "--ttl" {
                    ttl = Some(Duration::from_secs(secs));
                } else {
                    lock_delay = Some(Duration::from_secs(secs));
                }
            }
            "--out" => out = Some(PathBuf::from(value("--out")?)),
            "--dir" => dir = Some(PathBuf::from(value("--dir")?)),
            "--go-bin" => go_bin = Some(PathBuf::from(value("--go-bin")?)),
            other => return Err(usage(format!("lab: unknown argument {other:?}"))),
        }
    }
    let dir = dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("consul-lock-lab-{}-{}", std::process::id(), now_secs()))
    });
    if check_cluster {
        return check_cluster_once(dir);
    }
    let mut plan = if short {
        LabPlan::short(clients.clone())
    } else {
        LabPlan::long(clients.clone(), Duration::from_secs(60 * minutes.unwrap_or(30)))
    };
    if let Some(faults) = faults {
        plan.kinds = faults;
    }
    plan.ttl = ttl.unwrap_or(plan.ttl);
    plan.lock_delay = lock_delay.unwrap_or(plan.lock_delay);
    let go = if clients.contains(&ClientKind::Go) {
        Some(go_contender(go_bin)?)
    } else {
        None
    };
    let launcher = Launcher {
        own_exe: std::env::current_exe().map_err(|source| BenchError::Io {
            what: "finding this program".to_owned(),
            source,
        })?,
        go,
    };
    let results = lab::run(&plan, &launcher, dir, &mut std::io::stderr())?;
    let out = out.unwrap_or_else(|| {
        repo_root()
            .join("target")
            .join("consul-lock-bench")
            .join("lab.json")
    });
    lab::write(&results, &out)?;
    print!("{}", results.table());
    println!("\nresults: {}", out.display());
    Ok(())
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `lab --check-cluster`: the cluster comes up, a partitioned leader is replaced, the heal lets
/// every agent see the leader again, and it all goes away.
fn check_cluster_once(dir: PathBuf) -> Result<(), BenchError> {
    use consul_lock_testkit::cluster::{Cluster, ClusterOptions, READY_DEADLINE};
    let failed = |e: consul_lock_testkit::cluster::ClusterError| BenchError::Request {
        what: "the lab's cluster",
        msg: e.to_string(),
    };
    let cluster = Cluster::start(&ClusterOptions {
        servers: 3,
        clients: 2,
        dir,
    })
    .map_err(failed)?;
    let old = cluster.wait_ready(READY_DEADLINE).map_err(failed)?;
    eprintln!("lab: cluster up, leader {}", cluster.agents()[old].name);
    cluster.isolate(old).map_err(failed)?;
    let deadline = std::time::Instant::now() + READY_DEADLINE;
    let new = loop {
        // The isolated leader no longer answers for the cluster; ask the others.
        let others: Vec<usize> = cluster.servers().into_iter().filter(|&s| s != old).collect();
        let seen: Vec<Option<String>> = others.iter().map(|&s| cluster.leader_seen_by(s)).collect();
        let elected = others.iter().find(|&&s| {
            seen.iter()
                .all(|l| l.as_deref() == Some(&format!("{}:8300", cluster.agents()[s].ip)))
        });
        if let Some(&s) = elected {
            break s;
        }
        if std::time::Instant::now() > deadline {
            return Err(BenchError::Request {
                what: "the lab's cluster",
                msg: format!(
                    "no new leader among the others after isolating {}",
                    cluster.agents()[old].name
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "lab: {} isolated, {} elected",
        cluster.agents()[old].name,
        cluster.agents()[new].name
    );
    cluster.heal().map_err(failed)?;
    let leader = cluster.wait_ready(READY_DEADLINE).map_err(failed)?;
    println!(
        "cluster ok: {} replaced {} as leader while it was isolated; {} leads after the heal",
        cluster.agents()[new].name,
        cluster.agents()[old].name,
        cluster.agents()[leader].name
    );
    Ok(())
}

/// The Go contender: the given binary, or the one `scripts/ensure-go-contender.sh` builds.
fn go_contender(given: Option<PathBuf>) -> Result<PathBuf, BenchError> {
    if let Some(path) = given {
        return if path.is_file() {
            Ok(path)
        } else {
            Err(BenchError::GoUnavailable(format!(
                "{} is not a file",
                path.display()
            )))
        };
    }
    let script = repo_root().join("scripts").join("ensure-go-contender.sh");
    let output = std::process::Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| BenchError::GoUnavailable(format!("running {}: {e}", script.display())))?;
    let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    if output.status.success() && path.is_file() {
        Ok(path)
    } else {
        Err(BenchError::GoUnavailable(format!(
            "{} failed ({})",
            script.display(),
            output.status
        )))
    }
}

fn machine(agent: &ConsulAgent) -> Machine {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|v| v.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let consul = std::process::Command::new(agent.binary())
        .arg("version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "consul (version unknown)".to_owned());
    Machine {
        cpu,
        cpus: std::thread::available_parallelism().map_or(1, usize::from),
        kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
        consul,
    }
}

/// A comma-separated list of counts (each above 0) given to `flag`.
fn counts(flag: &str, list: &str) -> Result<Vec<usize>, BenchError> {
    list.split(',')
        .map(|n| {
            n.parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| BenchError::Usage(format!("{flag}: {n:?} is not a count")))
        })
        .collect()
}
