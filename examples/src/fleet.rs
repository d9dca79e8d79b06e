//! The store as a fleet on one machine: the decisions of the `fleet`
//! binary, apart from the processes it runs.
//!
//! `fleet` starts `shop` replicas that share PostgreSQL (the store and its
//! e-mails' outbox), Redis (the cache's second tier, its purges, and the
//! replicas' measurements for the fleet-wide recommendation) behind
//! HAProxy, and an autoscaler that does what KEDA would: every interval it
//! reads a metric, decides a replica count, starts replicas (traffic only
//! once `/readyz` answers) or drains and stops them. It drives a compressed
//! day through HAProxy once per [`Policy`] and reports each.
//!
//! ```
//! use gratify_examples::fleet::{Policy, Scaler};
//!
//! // Requests per second per replica, as KEDA's Prometheus scaler targets.
//! let mut scaler = Scaler::new(Policy::RpsTarget(100.0), 1, 4, 2);
//! assert_eq!(scaler.decide(1, Some(250.0), None), 3, "up at once");
//! assert_eq!(scaler.decide(3, Some(50.0), None), 3, "down only to the window's highest");
//! assert_eq!(scaler.decide(3, None, None), 3, "no reading, no decision");
//! assert_eq!(scaler.decide(3, Some(50.0), None), 1);
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

/// How the autoscaler chooses the replica count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Policy {
    /// Always this many (sized for the peak).
    Fixed(usize),
    /// Enough replicas for each to see this many requests per second
    /// (KEDA's Prometheus scaler on a request rate, an HPA on the same).
    RpsTarget(f64),
    /// gratify's replica advisor: the fleet-wide recommendation every
    /// replica exports (`gratify_recommended_replicas`).
    Advisor,
}

impl Policy {
    /// A short name for reports.
    pub fn name(&self) -> String {
        match self {
            Self::Fixed(n) => format!("fixed-{n}"),
            Self::RpsTarget(rps) => format!("rps-{rps:.0}"),
            Self::Advisor => "advisor".to_owned(),
        }
    }
}

/// The autoscaler's decisions, as the HPA under KEDA makes them: up at
/// once to what the policy wants; down only to the highest it wanted over
/// the last `window` readings (the scale-down stabilisation window), never
/// below `min` or above `max`. A missing reading decides nothing.
#[derive(Debug, Clone)]
pub struct Scaler {
    policy: Policy,
    min: usize,
    max: usize,
    window: usize,
    recent: std::collections::VecDeque<usize>,
}

impl Scaler {
    /// A scaler for `policy` within `min..=max` replicas, with a
    /// scale-down window of `window` readings.
    pub fn new(policy: Policy, min: usize, max: usize, window: usize) -> Self {
        let min = min.max(1);
        Self {
            policy,
            min,
            max: max.max(min),
            window: window.max(1),
            recent: std::collections::VecDeque::new(),
        }
    }

    /// The replica count to run, given the `current` count, the request
    /// rate the load balancer saw over the last interval (all replicas;
    /// `None`: not read) and the advisor's fleet-wide recommendation
    /// (`None`: not read, or stale).
    pub fn decide(&mut self, current: usize, rps: Option<f64>, advised: Option<f64>) -> usize {
        let wanted = match self.policy {
            Policy::Fixed(n) => Some(n),
            Policy::RpsTarget(target) => rps
                .filter(|r| r.is_finite() && target > 0.0 && target.is_finite())
                .map(|r| (r.max(0.0) / target).ceil() as usize),
            Policy::Advisor => advised
                .filter(|n| n.is_finite() && *n >= 0.0)
                .map(|n| n.ceil() as usize),
        };
        let Some(wanted) = wanted.map(|w| w.clamp(self.min, self.max)) else {
            return current.clamp(self.min, self.max);
        };
        self.recent.push_back(wanted);
        while self.recent.len() > self.window {
            self.recent.pop_front();
        }
        if wanted >= current {
            return wanted;
        }
        if self.recent.len() < self.window {
            return current.min(self.max);
        }
        let highest = self.recent.iter().copied().max().unwrap_or(wanted);
        highest.min(current)
    }
}

/// The shape of the compressed day at fraction `x` of the run, 0..=1 of
/// the peak rate: a diurnal curve (`night` at the ends, highest mid-run) at
/// `1 / crowd.multiple` of the peak, and a flash crowd that multiplies it.
pub fn day_shape(x: f64, night: f64, crowd: Crowd) -> f64 {
    let x = x.clamp(0.0, 1.0);
    let diurnal = night + (1.0 - night) * (std::f64::consts::PI * x).sin().powi(2);
    let base = diurnal / crowd.multiple.max(1.0);
    if x >= crowd.start && x < crowd.start + crowd.length {
        (base * crowd.multiple).min(1.0)
    } else {
        base
    }
}

/// A flash crowd in the compressed day.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Crowd {
    /// When it starts, as a fraction of the run.
    pub start: f64,
    /// How long it lasts, as a fraction of the run.
    pub length: f64,
    /// How many times the usual traffic it brings.
    pub multiple: f64,
}

/// HAProxy's configuration for the fleet: a frontend on `bind` that keeps
/// the replicas' `/ops/` endpoints (purges, the admin service) to itself, a
/// backend of `servers` slots (`s1`, `s2`, …) that start in maintenance and
/// are pointed at replicas through the runtime API on `socket`; health
/// checks on `/readyz` (three failed in a row, each given 2 s, take a
/// replica out). Requests go to the replica with the fewest in flight; a
/// failed connection (never a request that reached a replica) is tried once
/// on another; a request whose client left while it was queued here is not
/// sent.
pub fn haproxy_config(bind: SocketAddr, socket: &Path, servers: usize) -> String {
    format!(
        "global
    stats socket {socket} mode 600 level admin
    maxconn 8192

defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout queue 10s
    timeout check 2s
    option http-server-close
    option abortonclose
    retries 1
    option redispatch
    retry-on conn-failure

frontend web
    bind {bind}
    # The replicas' operations endpoints are for the fleet's own network.
    http-request deny deny_status 404 if {{ path_beg /ops/ }}
    default_backend shop

backend shop
    balance leastconn
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 250ms fall 3 rise 1 check
    server-template s 1-{servers} 127.0.0.1:9 disabled
",
        socket = socket.display(),
    )
}

/// The runtime API commands that point slot `slot` (1-based) at a replica
/// on `port` and let traffic in.
pub fn enable_commands(slot: usize, port: u16) -> [String; 2] {
    [
        format!("set server shop/s{slot} addr 127.0.0.1 port {port}"),
        format!("set server shop/s{slot} state ready"),
    ]
}

/// Current sessions per server of `backend` (HAProxy's `show stat` CSV:
/// `scur`), and the frontend's requests so far (`req_tot`) under the name
/// `FRONTEND`. Lines that do not parse are skipped.
pub fn parse_stat(csv: &str, backend: &str) -> BTreeMap<String, u64> {
    let mut header: Vec<&str> = Vec::new();
    let mut out = BTreeMap::new();
    for line in csv.lines() {
        if let Some(names) = line.strip_prefix("# ") {
            header = names.split(',').collect();
            continue;
        }
        let fields: Vec<&str> = line.split(',').collect();
        let column = |name: &str| {
            header
                .iter()
                .position(|h| *h == name)
                .and_then(|i| fields.get(i))
                .and_then(|v| v.parse::<u64>().ok())
        };
        match (fields.first(), fields.get(1)) {
            (Some(px), Some(&"FRONTEND")) if *px == "web" => {
                if let Some(n) = column("req_tot") {
                    out.insert("FRONTEND".to_owned(), n);
                }
            }
            (Some(px), Some(sv)) if *px == backend && *sv != "BACKEND" => {
                if let Some(n) = column("scur") {
                    out.insert((*sv).to_owned(), n);
                }
            }
            _ => {}
        }
    }
    out
}

/// The value of the first sample of gauge `name` in Prometheus text
/// (`name value` or `name{labels} value`).
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let rest = line.strip_prefix(name)?;
            let rest = match rest.strip_prefix('{') {
                Some(labelled) => &labelled[labelled.find('}')? + 1..],
                None => rest,
            };
            if !rest.starts_with(' ') {
                return None;
            }
            rest.split_whitespace().next()?.parse().ok()
        })
}

/// One policy's lines in [`plot`]: replicas taking traffic at each change,
/// and p99 latency by window (seconds, value).
#[derive(Debug, Clone)]
pub struct PlotLine {
    /// The policy.
    pub name: String,
    /// (seconds, replicas) at each change.
    pub replicas: Vec<(f64, usize)>,
    /// (seconds, p99 ms).
    pub p99: Vec<(f64, f64)>,
}

/// Replicas (a step line) and p99 over `end` seconds, a panel each and a
/// colour per policy, as SVG. (Hand-written, as the demo's plot: two
/// panels of polylines are a few dozen lines, and the examples do not
/// build a plotting crate.)
pub fn plot(lines: &[PlotLine], end: f64) -> String {
    use std::fmt::Write as _;
    const COLOURS: [&str; 4] = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"];
    let (width, panel, left, top) = (900.0, 260.0, 60.0, 30.0);
    let end = end.max(1.0);
    let max_replicas = lines
        .iter()
        .flat_map(|l| l.replicas.iter().map(|(_, n)| *n))
        .max()
        .unwrap_or(1)
        .max(1) as f64
        + 1.0;
    let max_p99 = lines
        .iter()
        .flat_map(|l| l.p99.iter().map(|(_, v)| *v))
        .filter(|v| v.is_finite())
        .fold(10.0, f64::max)
        * 1.1;
    let x = |t: f64| left + (t / end).clamp(0.0, 1.0) * (width - left - 20.0);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>"##,
        h = 2.0 * (panel + top) + 30.0
    );
    for (k, (title, max)) in [
        ("replicas taking traffic", max_replicas),
        ("p99 latency, ms (5 s windows)", max_p99),
    ]
    .into_iter()
    .enumerate()
    {
        let y0 = top + k as f64 * (panel + top);
        let y = |v: f64| y0 + panel - (v / max).clamp(0.0, 1.0) * panel;
        let _ = write!(
            svg,
            r##"<text x="{left}" y="{t}" font-size="14">{title}</text><line x1="{left}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/><line x1="{left}" y1="{y0}" x2="{left}" y2="{b}" stroke="black"/><text x="{lx}" y="{ty}" text-anchor="end">{max:.0}</text><text x="{lx}" y="{b}" text-anchor="end">0</text><text x="{r}" y="{bl}" text-anchor="end">{end:.0} s</text>"##,
            t = y0 - 8.0,
            b = y0 + panel,
            r = width - 20.0,
            lx = left - 6.0,
            ty = y0 + 10.0,
            bl = y0 + panel + 14.0,
        );
        for (i, line) in lines.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let points: Vec<(f64, f64)> = if k == 0 {
                let mut steps = Vec::new();
                let mut last = None;
                for (t, n) in &line.replicas {
                    if let Some(previous) = last {
                        steps.push((*t, previous));
                    }
                    steps.push((*t, *n as f64));
                    last = Some(*n as f64);
                }
                if let Some(previous) = last {
                    steps.push((end, previous));
                }
                steps
            } else {
                line.p99
                    .iter()
                    .copied()
                    .filter(|(_, v)| v.is_finite())
                    .collect()
            };
            let path: Vec<String> = points
                .iter()
                .map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v)))
                .collect();
            let _ = write!(
                svg,
                r##"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"##,
                path.join(" ")
            );
            if k == 0 {
                let _ = write!(
                    svg,
                    r##"<text x="{lx}" y="{ly}" fill="{colour}">{name}</text>"##,
                    lx = width - 160.0,
                    ly = y0 + 14.0 + 14.0 * i as f64,
                    name = line.name,
                );
            }
        }
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_and_advisor_policies_and_the_bounds() {
        let mut fixed = Scaler::new(Policy::Fixed(4), 1, 4, 3);
        assert_eq!(fixed.decide(1, None, None), 4);
        assert_eq!(fixed.decide(4, None, Some(1.0)), 4);
        let mut advisor = Scaler::new(Policy::Advisor, 1, 6, 2);
        assert_eq!(advisor.decide(2, None, Some(4.2)), 5);
        assert_eq!(advisor.decide(5, None, None), 5, "no reading: no change");
        assert_eq!(advisor.decide(5, None, Some(f64::NAN)), 5);
        assert_eq!(advisor.decide(5, None, Some(100.0)), 6, "never above max");
        assert_eq!(advisor.decide(6, None, Some(0.0)), 6);
        assert_eq!(advisor.decide(6, None, Some(0.0)), 1, "never below min");
        // A higher reading in the window holds the count.
        assert_eq!(advisor.decide(1, None, Some(3.0)), 3);
        assert_eq!(advisor.decide(3, None, Some(2.0)), 3);
        assert_eq!(advisor.decide(3, None, Some(3.0)), 3);
        assert_eq!(advisor.decide(3, None, Some(2.0)), 3);
        assert_eq!(advisor.decide(3, None, Some(2.0)), 2);
        // Down to the highest of the window, as the HPA: 3 then 1 is 3.
        let mut hpa = Scaler::new(Policy::Advisor, 1, 6, 2);
        assert_eq!(hpa.decide(4, None, Some(3.0)), 4);
        assert_eq!(hpa.decide(4, None, Some(1.0)), 3);
        // A rate target that cannot be met decides nothing.
        let mut rps = Scaler::new(Policy::RpsTarget(0.0), 1, 6, 2);
        assert_eq!(rps.decide(2, Some(1e9), None), 2);
        let mut rps = Scaler::new(Policy::RpsTarget(100.0), 1, 6, 2);
        assert_eq!(rps.decide(2, Some(f64::INFINITY), None), 2);
        assert_eq!(rps.decide(2, Some(450.0), None), 5);
    }

    #[test]
    fn the_day_peaks_in_its_crowd() {
        let crowd = Crowd {
            start: 0.6,
            length: 0.1,
            multiple: 2.0,
        };
        let at = |x| day_shape(x, 0.2, crowd);
        assert!(
            (at(0.0) - 0.1).abs() < 1e-9,
            "night, at half the peak's base"
        );
        assert!((at(0.5) - 0.5).abs() < 1e-9, "midday: the base's top");
        let calm = |x| {
            day_shape(
                x,
                0.2,
                Crowd {
                    length: 0.0,
                    ..crowd
                },
            )
        };
        assert!(
            (at(0.65) - 2.0 * calm(0.65)).abs() < 1e-9,
            "the crowd doubles it"
        );
        assert_eq!(at(0.55), calm(0.55));
        assert!((0.0..=1.0).contains(&at(0.65)));
        assert!(at(0.75) < at(0.65));
    }

    #[test]
    fn stats_and_metrics_are_read_from_haproxy_and_prometheus_text() {
        let csv = "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,throttle,lbtot,tracked,type,rate,rate_lim,rate_max,check_status,check_code,check_duration,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,hanafail,req_rate,req_rate_max,req_tot\n\
web,FRONTEND,,,3,10,8192,120,0,0,0,0,0,,,,,OPEN,,,,,,,,,1,2,0,,,,0,5,0,9,,,,0,100,0,0,2,0,,5,9,1234\n\
shop,s1,0,0,2,4,,50,0,0,,0,,0,0,0,0,UP,1,1,0,0,0,10,0,,1,3,1,,50,,2,0,,4,L7OK,200,1,0,50,0,0,0,0,,,,\n\
shop,s2,0,0,0,0,,0,0,0,,0,,0,0,0,0,MAINT,1,1,0,0,0,10,0,,1,3,2,,0,,2,0,,0,,,,0,0,0,0,0,0,,,,\n\
shop,BACKEND,0,0,2,4,,50,0,0,0,0,,0,0,0,0,UP,1,1,0,,0,10,0,,1,3,0,,50,,1,0,,4,,,,0,50,0,0,0,0,,,,\n";
        let stat = parse_stat(csv, "shop");
        assert_eq!(stat.get("FRONTEND"), Some(&1234));
        assert_eq!(stat.get("s1"), Some(&2));
        assert_eq!(stat.get("s2"), Some(&0));
        assert!(!stat.contains_key("BACKEND"));
        assert!(parse_stat("garbage\n,,,", "shop").is_empty());

        let text = "# TYPE gratify_recommended_replicas gauge\n\
gratify_recommended_replicas_total 9\n\
gratify_recommended_replicas{fleet=\"shop\"} 3\n";
        assert_eq!(
            metric_value(text, "gratify_recommended_replicas"),
            Some(3.0)
        );
        assert_eq!(metric_value("x 1\n", "gratify_recommended_replicas"), None);
    }

    #[test]
    fn haproxy_is_told_where_each_replica_listens() {
        let config = haproxy_config(
            "127.0.0.1:8000".parse().unwrap(),
            Path::new("/tmp/s.sock"),
            6,
        );
        assert!(config.contains("server-template s 1-6 127.0.0.1:9 disabled"));
        assert!(config.contains("option httpchk GET /readyz"));
        assert!(config.contains("bind 127.0.0.1:8000"));
        // Only a failed connection is retried: never a request that may
        // have reached a replica (a checkout must not run twice).
        assert!(config.contains("retry-on conn-failure\n"));
        // The operations endpoints are not the public's.
        assert!(config.contains("deny deny_status 404 if { path_beg /ops/ }"));
        assert_eq!(
            enable_commands(2, 9001),
            [
                "set server shop/s2 addr 127.0.0.1 port 9001".to_owned(),
                "set server shop/s2 state ready".to_owned()
            ]
        );
    }

    #[test]
    fn the_plot_names_each_policy_and_draws_its_lines() {
        let lines = [
            PlotLine {
                name: "fixed-4".into(),
                replicas: vec![(0.0, 4), (300.0, 4)],
                p99: vec![(2.5, 40.0), (7.5, 45.0)],
            },
            PlotLine {
                name: "advisor".into(),
                replicas: vec![(0.0, 1), (120.0, 3), (300.0, 3)],
                p99: vec![(2.5, 50.0), (7.5, f64::NAN)],
            },
        ];
        let svg = plot(&lines, 300.0);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains(">fixed-4<") && svg.contains(">advisor<"));
        assert_eq!(
            svg.matches("<polyline").count(),
            4,
            "two panels, two policies"
        );
        assert!(!svg.contains("NaN"));
    }
}
