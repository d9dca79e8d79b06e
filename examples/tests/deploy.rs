//! The deployment artefacts in `deploy/` say what the docs promise, and
//! agree with the store they run: probes on the store's exempt health
//! paths, a shutdown that fits the grace period, a user without
//! privileges, the scalers on the metric the store exports.
#![allow(clippy::unwrap_used)] // test helpers: a failure is a failed test

use std::path::Path;

use axum::body::Body;
use gratify::telemetry;
use gratify_examples::shop::Shop;
use http::{Request, StatusCode};
use serde::Deserialize;
use serde_json::Value;
use tower::ServiceExt;

fn read(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every YAML document of `path`, as JSON values.
fn documents(path: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(&read(path))
        .map(|doc| Value::deserialize(doc).unwrap())
        .collect()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or_else(|| panic!("not an integer: {v}"))
}

/// The value after `flag` in `args`.
fn flag<'a>(args: &'a [Value], flag: &str) -> &'a str {
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    args[i + 1].as_str().unwrap()
}

#[tokio::test]
async fn the_deployment_probes_the_stores_health_and_fits_its_shutdown() {
    let docs = documents("deploy/kubernetes/shop.yaml");
    let deployment = kind(&docs, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];

    // The probes ask the store's health paths, which the stack never sheds
    // (exempt in shop.toml) and which answer 200 while it serves.
    let shop = Shop::in_memory().unwrap();
    let app = shop.router();
    let config = read("examples/shop/shop.toml");
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(c[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], "http", "{probe}");
        assert!(
            config.contains(&format!("\"{path}\"")),
            "{path} is not exempt"
        );
        let request = Request::get(path)
            .header("host", "shop.example")
            .body(Body::empty())
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    shop.shutdown().await;

    // The named port is the one the store listens on.
    let args = c["args"].as_array().unwrap();
    let port = &c["ports"].as_array().unwrap()[0];
    assert_eq!(port["name"], "http");
    let listen = flag(args, "--listen");
    assert!(
        listen.ends_with(&format!(":{}", int(&port["containerPort"]))),
        "{listen}"
    );

    // Shutdown: preStop, then the readiness grace, requests in flight (at
    // most the longest class deadline, 5 s), the mailer (10 s) and the
    // fleet (2 s) the binary waits for, the deferred work's drain (10 s)
    // and the CPU pool's (2 s) all fit the grace period.
    let pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
        .as_array()
        .unwrap();
    assert_eq!(pre_stop[0], "/bin/sleep");
    let pre_stop: i64 = pre_stop[1].as_str().unwrap().parse().unwrap();
    let grace: i64 = flag(args, "--readiness-grace").parse().unwrap();
    let needed = pre_stop + grace + 5 + 10 + 2 + 10 + 2;
    assert!(
        int(&pod["terminationGracePeriodSeconds"]) >= needed,
        "needs {needed} s"
    );
    // Readiness fails fast enough for the grace to matter.
    let ready = &c["readinessProbe"];
    assert!(int(&ready["periodSeconds"]) * int(&ready["failureThreshold"]) < grace);

    // Not root, as the image.
    let dockerfile = read("deploy/Dockerfile");
    let user = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .unwrap();
    let uid: i64 = user.split(':').next().unwrap().parse().unwrap();
    assert!(uid > 0);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(int(&pod["securityContext"]["runAsUser"]), uid);

    // Prometheus scrapes the admin service's text.
    let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/path"], "/ops/admin/metrics");

    // The Service selects the pods and targets the named port.
    let service = kind(&docs, "Service");
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (k, v) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&labels[k], v);
    }
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");

    // Every flag given exists in the binary built with the features the
    // image builds it with.
    #[cfg(all(feature = "redis", feature = "postgres"))]
    {
        let help = std::process::Command::new(env!("CARGO_BIN_EXE_shop"))
            .arg("--help")
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&help.stdout);
        let words: Vec<&str> = help
            .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
            .collect();
        for arg in args.iter().filter_map(Value::as_str) {
            if arg.starts_with("--") {
                assert!(words.contains(&arg), "{arg} is not a flag of shop");
            }
        }
        // The environment the pod sets is what the binary reads.
        for var in c["env"].as_array().unwrap() {
            let name = var["name"].as_str().unwrap();
            if name.starts_with("SHOP_") {
                assert!(
                    words.contains(&format!("env:{name}").as_str())
                        || help.contains(&format!("[env: {name}")),
                    "{name} is not read by shop"
                );
            }
        }
        assert!(
            read("deploy/Dockerfile").contains("--features redis,postgres"),
            "the image builds the flags the Deployment uses"
        );
    }
}

#[test]
fn the_image_is_built_in_one_stage_and_run_in_another_without_privileges() {
    let dockerfile = read("deploy/Dockerfile");
    let stages: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(stages.len(), 2, "{stages:?}");
    assert!(stages[0].contains(" AS build"));
    assert!(dockerfile.contains("COPY --from=build"));
    // The arguments are CMD, so that a Deployment's `args` replace them.
    let entrypoint = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("ENTRYPOINT "))
        .unwrap();
    let entrypoint: Vec<String> = serde_json::from_str(entrypoint).unwrap();
    assert_eq!(entrypoint, ["/usr/local/bin/shop"]);
    let cmd = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("CMD "))
        .unwrap();
    let cmd: Vec<String> = serde_json::from_str(cmd).unwrap();
    assert!(cmd.contains(&"--readiness-grace".to_owned()));
    let user = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .unwrap();
    assert!(
        !user.starts_with('0') && !user.starts_with("root"),
        "{user}"
    );
    assert!(dockerfile.contains("EXPOSE 8080"));
}

#[test]
fn the_scalers_follow_the_metric_the_store_exports() {
    let metric = telemetry::RECOMMENDED_REPLICAS.name;
    let hpa = &documents("deploy/kubernetes/hpa.yaml")[0];
    assert_eq!(hpa["kind"], "HorizontalPodAutoscaler");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Deployment");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "shop");
    let external = &hpa["spec"]["metrics"][0]["external"];
    assert_eq!(external["metric"]["name"], metric);
    // Desired replicas = the recommendation.
    assert_eq!(external["target"]["type"], "AverageValue");
    assert_eq!(external["target"]["averageValue"], "1");

    let keda = &documents("deploy/kubernetes/keda.yaml")[0];
    assert_eq!(keda["kind"], "ScaledObject");
    assert_eq!(keda["spec"]["scaleTargetRef"]["name"], "shop");
    let trigger = &keda["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "prometheus");
    assert_eq!(trigger["metricType"], "AverageValue");
    assert_eq!(trigger["metadata"]["threshold"], "1");
    // The max over the pods: every replica reports the fleet's count.
    let query = trigger["metadata"]["query"].as_str().unwrap();
    assert!(query.starts_with(&format!("max({metric}")), "{query}");

    // Both scale the Deployment of shop.yaml, within the same bounds.
    let docs = documents("deploy/kubernetes/shop.yaml");
    assert_eq!(kind(&docs, "Deployment")["metadata"]["name"], "shop");
    assert_eq!(hpa["spec"]["minReplicas"], keda["spec"]["minReplicaCount"]);
    assert_eq!(hpa["spec"]["maxReplicas"], keda["spec"]["maxReplicaCount"]);
}
