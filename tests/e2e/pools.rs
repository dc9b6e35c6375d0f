//! Capacity pools and job demands as surfaces: `jobplane pools set|get|ls|rm`, the pool RPCs,
//! `submit --pool/--cpu/--memory/--selector`, and validation naming the field. Scheduling on
//! pools is tested elsewhere: nothing here depends on a pool being enforced.

use std::time::Duration;

use jobplane::{Error, JobSpec, PoolConfig, PoolRequest, RateLimit, Resources};
use jobplane_tests::{guard, jobplane_bin, TestServer};
use serde_json::{json, Value};

/// Runs a client command to completion: (exit code, stdout, stderr).
async fn cli(addr: &str, args: &[&str]) -> (i32, String, String) {
    let out = guard(
        "the jobplane command",
        tokio::process::Command::new(jobplane_bin())
            .args(args)
            .env("JOBPLANE_ADDR", addr)
            .env("NO_COLOR", "1")
            .output(),
    )
    .await
    .expect("run jobplane");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a command that must succeed and print one JSON value.
async fn cli_json(addr: &str, args: &[&str]) -> Value {
    let (code, stdout, stderr) = cli(addr, args).await;
    assert_eq!(code, 0, "jobplane {args:?} failed: {stderr}");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

#[tokio::test]
async fn pools_set_get_ls_rm_through_the_cli() {
    let server = TestServer::start().await;
    let addr = server.addr.as_str();

    let set = cli_json(
        addr,
        &[
            "pools",
            "set",
            "gpt-4o",
            "--max-units",
            "requests=2",
            "--rate",
            "tokens=90000/1m",
            "--rate",
            "requests=10/1s:burst=20",
            "--output",
            "json",
        ],
    )
    .await;
    assert_eq!(set["name"], "gpt-4o");
    assert_eq!(set["namespace"], "default");
    assert_eq!(
        set["config"],
        json!({
            "max_units": {"requests": 2},
            "rates": [
                {"unit": "tokens", "amount": 90000, "per": "1m", "burst": 90000},
                {"unit": "requests", "amount": 10, "per": "1s", "burst": 20},
            ],
            "shared": false,
            "weights": {},
        })
    );

    let get = cli_json(addr, &["pools", "get", "gpt-4o", "--output", "json"]).await;
    assert_eq!(get["config"], set["config"]);
    // The live figures are all there: units in use, tokens, waiting jobs, cooldown, epoch.
    for key in [
        "in_use",
        "tokens",
        "running",
        "waiting",
        "cooldown_until",
        "epoch",
    ] {
        assert!(get.get(key).is_some(), "`{key}` missing from {get}");
    }
    assert_eq!(get["waiting"], 0);
    assert_eq!(get["cooldown_until"], Value::Null);

    // The table says the same for people.
    let (code, table, _) = cli(addr, &["pools", "get", "gpt-4o"]).await;
    assert_eq!(code, 0);
    assert!(table.contains("requests=2"), "{table}");
    assert!(table.contains("tokens=90000/1m"), "{table}");
    assert!(table.contains("requests=10/1s:burst=20"), "{table}");

    cli_json(
        addr,
        &[
            "pools",
            "set",
            "mini",
            "--max-units",
            "requests=8",
            "--output",
            "json",
        ],
    )
    .await;
    let ls = cli_json(addr, &["pools", "ls", "--output", "json"]).await;
    let names: Vec<&str> = ls
        .as_array()
        .expect("an array")
        .iter()
        .map(|p| p["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["gpt-4o", "mini"], "by name");
    let (code, table, _) = cli(addr, &["pools", "ls"]).await;
    assert_eq!(code, 0);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.contains("gpt-4o") && table.contains("mini"),
        "{table}"
    );

    // `set` replaces the limits whole: the rates are gone.
    let set = cli_json(
        addr,
        &[
            "pools",
            "set",
            "gpt-4o",
            "--max-units",
            "requests=3",
            "--output",
            "json",
        ],
    )
    .await;
    assert_eq!(
        set["config"],
        json!({"max_units": {"requests": 3}, "rates": [], "shared": false, "weights": {}})
    );

    // A shared pool, with a namespace weighing more than the others.
    let shared = cli_json(
        addr,
        &[
            "pools",
            "set",
            "llm",
            "--max-units",
            "requests=4",
            "--shared",
            "--weight",
            "team-a=3",
            "--output",
            "json",
        ],
    )
    .await;
    assert_eq!(shared["config"]["shared"], true);
    assert_eq!(shared["config"]["weights"], json!({"team-a": 3}));
    let (code, table, _) = cli(addr, &["pools", "get", "llm"]).await;
    assert_eq!(code, 0);
    assert!(table.contains("team-a=3"), "{table}");
    for (bad, want) in [
        (vec!["--weight", "team-a=3"], "--shared"),
        (vec!["--shared", "--weight", "team-a=0"], "at least 1"),
        (vec!["--shared", "--weight", "=2"], "namespace is missing"),
    ] {
        let mut args = vec!["pools", "set", "llm", "--max-units", "requests=1"];
        args.extend(bad);
        let (code, _, stderr) = cli(addr, &args).await;
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
    let rm = cli_json(addr, &["pools", "rm", "llm", "--output", "json"]).await;
    assert_eq!(rm["deleted"], true);

    let rm = cli_json(addr, &["pools", "rm", "gpt-4o", "--output", "json"]).await;
    assert_eq!(rm["deleted"], true);
    let (code, _, stderr) = cli(addr, &["pools", "get", "gpt-4o"]).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("gpt-4o"), "{stderr}");
    let (code, _, _) = cli(addr, &["pools", "rm", "gpt-4o"]).await;
    assert_eq!(code, 1, "deleting what is not there fails");
    let ls = cli_json(addr, &["pools", "ls", "--output", "json"]).await;
    assert_eq!(ls.as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn cli_errors_name_the_flag_or_the_field() {
    let server = TestServer::start().await;
    let addr = server.addr.as_str();

    // Parse errors are usage errors (exit 2) naming the flag.
    for (args, flag) in [
        (&["pools", "set", "p", "--rate", "tokens=5"][..], "--rate"),
        (
            &["pools", "set", "p", "--max-units", "requests"],
            "--max-units",
        ),
        (&["submit", "q", "--pool", "p:tokens=many"], "--pool"),
        (&["submit", "q", "--pool", "p@soon"], "--pool"),
        (&["submit", "q", "--memory", "lots"], "--memory"),
        (&["submit", "q", "--cpu", "-2"], "--cpu"),
        (&["submit", "q", "--selector", "novalue"], "--selector"),
    ] {
        let (code, _, stderr) = cli(addr, args).await;
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
    // A pool without limits is refused before it is sent.
    let (code, _, stderr) = cli(addr, &["pools", "set", "p"]).await;
    assert_eq!(code, 2, "{stderr}");

    // What only the service knows is refused by it, naming the field.
    for (args, field) in [
        (
            &["pools", "set", "p", "--rate", "tokens=0/1m"][..],
            "config.rates[0].amount",
        ),
        (
            &["pools", "set", "p", "--max-units", "Requests=2"],
            "config.max_units[\"Requests\"]",
        ),
        (
            &["pools", "set", "bad pool", "--max-units", "requests=1"],
            "name",
        ),
        (
            &["submit", "q", "--pool", "a", "--pool", "b:tokens=0"],
            "spec.pools[1].units[\"tokens\"]",
        ),
        (
            &["submit", "q", "--pool", "a", "--pool", "a@0s"],
            "spec.pools[1].pool",
        ),
    ] {
        let (code, _, stderr) = cli(addr, args).await;
        assert_eq!(code, 1, "{args:?}: {stderr}");
        assert!(stderr.contains(field), "{args:?}: {stderr}");
    }
    let ls = cli_json(addr, &["pools", "ls", "--output", "json"]).await;
    assert_eq!(ls, json!([]), "nothing was created");
}

#[tokio::test]
async fn submit_shows_the_demand_in_the_job() {
    let server = TestServer::start().await;
    let addr = server.addr.as_str();
    for pool in ["gpt-4o", "gpt-4o-mini"] {
        cli_json(
            addr,
            &[
                "pools",
                "set",
                pool,
                "--max-units",
                "requests=1",
                "--output",
                "json",
            ],
        )
        .await;
    }

    let job = cli_json(
        addr,
        &[
            "submit",
            "chat",
            "--pool",
            "gpt-4o:tokens=1200@5s",
            "--pool",
            "gpt-4o-mini@0s",
            "--cpu",
            "0.5",
            "--memory",
            "512Mi",
            "--selector",
            "gpu=a100",
            "--output",
            "json",
        ],
    )
    .await;
    let want_pools = json!([
        {"pool": "gpt-4o", "units": {"requests": 1, "tokens": 1200}, "max_wait": "5s"},
        {"pool": "gpt-4o-mini", "units": {"requests": 1}, "max_wait": "0s"},
    ]);
    assert_eq!(
        job["pools"], want_pools,
        "in fallback order, units defaulted"
    );
    assert_eq!(
        job["resources"],
        json!({"cpu": 0.5, "memory_bytes": 512u64 << 20})
    );
    assert_eq!(job["selector"], json!({"gpu": "a100"}));
    assert_eq!(job["pool"], Value::Null, "it has not run on any pool yet");
    assert!(job.get("waiting_for").is_some() && job.get("error").is_some());

    // Kept: `get` shows the same, and so does the SDK.
    let id = job["id"].as_str().expect("id");
    let got = cli_json(addr, &["get", id, "--output", "json"]).await;
    assert_eq!(got["pools"], want_pools);
    assert_eq!(got["resources"], job["resources"]);
    assert_eq!(got["selector"], job["selector"]);
    let (code, table, _) = cli(addr, &["get", id]).await;
    assert_eq!(code, 0);
    assert!(
        table.contains("gpt-4o:requests=1,tokens=1200@5s gpt-4o-mini:requests=1@0s"),
        "{table}"
    );

    let client = server.client().await;
    let job = client.get(id).await.unwrap();
    assert_eq!(
        job.pools,
        [
            PoolRequest::new("gpt-4o")
                .units("requests", 1)
                .units("tokens", 1200)
                .max_wait(Duration::from_secs(5)),
            PoolRequest::new("gpt-4o-mini")
                .units("requests", 1)
                .max_wait(Duration::ZERO),
        ]
    );
    assert_eq!(
        job.resources,
        Resources {
            cpu: 0.5,
            memory_bytes: 512 << 20
        }
    );
    assert_eq!(job.pool, None);

    // A job without a demand shows an empty one.
    let plain = cli_json(addr, &["submit", "chat", "--output", "json"]).await;
    assert_eq!(plain["pools"], json!([]));
    assert_eq!(plain["resources"], Value::Null);
    assert_eq!(plain["selector"], json!({}));
}

#[tokio::test]
async fn pools_through_grpc() {
    let server = TestServer::start().await;
    let client = server.client().await;

    let config = PoolConfig::new()
        .max_units("requests", 2)
        .max_units("tokens", 50_000)
        .rate(RateLimit::new("tokens", 90_000, Duration::from_secs(60)));
    let pool = client.configure_pool("gpt-4o", config).await.unwrap();
    assert_eq!(
        (pool.namespace.as_str(), pool.name.as_str()),
        ("default", "gpt-4o")
    );
    assert_eq!(
        pool.config,
        PoolConfig::new()
            .max_units("requests", 2)
            .max_units("tokens", 50_000)
            .rate(RateLimit::new("tokens", 90_000, Duration::from_secs(60)).burst(90_000)),
        "the service fills in the burst"
    );
    assert_eq!(pool.cooldown_until, None);
    assert_eq!(pool.waiting, 0);

    let got = client.get_pool("gpt-4o").await.unwrap();
    assert_eq!(got.config, pool.config);

    // Replaced whole.
    let pool = client
        .configure_pool("gpt-4o", PoolConfig::new().max_units("requests", 4))
        .await
        .unwrap();
    assert_eq!(pool.config, PoolConfig::new().max_units("requests", 4));

    // Namespaces do not see each other's pools.
    let other = client.with_namespace("tenant-b");
    assert!(other.list_pools().await.unwrap().is_empty());
    let e = other.get_pool("gpt-4o").await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    assert_eq!(e.reason(), Some("POOL_NOT_FOUND"));
    other
        .configure_pool("gpt-4o", PoolConfig::new().max_units("requests", 1))
        .await
        .unwrap();

    let names: Vec<String> = client
        .list_pools()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, ["gpt-4o"]);

    client.delete_pool("gpt-4o").await.unwrap();
    let e = client.get_pool("gpt-4o").await.unwrap_err();
    assert_eq!(e.reason(), Some("POOL_NOT_FOUND"));
    let e = client.delete_pool("gpt-4o").await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    assert_eq!(other.list_pools().await.unwrap().len(), 1, "untouched");
}

#[tokio::test]
async fn bad_pools_and_demands_name_the_field() {
    let server = TestServer::start().await;
    let client = server.client().await;

    let per = Duration::from_secs(1);
    for (name, config, field) in [
        ("p", PoolConfig::new(), "config"),
        (
            "p",
            PoolConfig::new().max_units("requests", 0),
            "config.max_units[\"requests\"]",
        ),
        (
            "p",
            PoolConfig::new()
                .rate(RateLimit::new("tokens", 1, per))
                .rate(RateLimit::new("tokens", 1, Duration::from_micros(10))),
            "config.rates[1].per",
        ),
        (
            "p",
            PoolConfig::new().rate(RateLimit::new("to kens", 1, per)),
            "config.rates[0].unit",
        ),
        ("", PoolConfig::new().max_units("requests", 1), "name"),
    ] {
        let e = client.configure_pool(name, config).await.unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { .. }), "{e:?}");
        assert_eq!(e.field(), Some(field));
    }
    let e = client
        .with_namespace("bad/ns")
        .list_pools()
        .await
        .unwrap_err();
    assert_eq!(e.field(), Some("namespace"));
    assert!(client.list_pools().await.unwrap().is_empty());

    for (spec, field) in [
        (
            JobSpec::new("q").pool(PoolRequest::new("bad pool")),
            "spec.pools[0].pool",
        ),
        (
            JobSpec::new("q")
                .pool(PoolRequest::new("a"))
                .pool(PoolRequest::new("b").units("tokens", 0)),
            "spec.pools[1].units[\"tokens\"]",
        ),
        (
            JobSpec::new("q").pool(PoolRequest::new("a").units("Tokens", 1)),
            "spec.pools[0].units[\"Tokens\"]",
        ),
        (
            JobSpec::new("q")
                .pool(PoolRequest::new("a"))
                .pool(PoolRequest::new("a").max_wait(Duration::ZERO)),
            "spec.pools[1].pool",
        ),
        (JobSpec::new("q").cpu(f64::NAN), "spec.resources.cpu"),
        (JobSpec::new("q").cpu(-1.0), "spec.resources.cpu"),
        (JobSpec::new("q").selector("", "x"), "spec.selector[\"\"]"),
    ] {
        let e = client.submit(spec).await.unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { .. }), "{e:?}");
        assert_eq!(e.field(), Some(field));
    }
    let too_many = (0..17).fold(JobSpec::new("q"), |s, i| {
        s.pool(PoolRequest::new(format!("p{i}")))
    });
    let e = client.submit(too_many).await.unwrap_err();
    assert_eq!(e.field(), Some("spec.pools"));
    let e = client
        .submit_batch(vec![
            JobSpec::new("q"),
            JobSpec::new("q").pool(PoolRequest::new("a").units("tokens", 0)),
        ])
        .await
        .unwrap_err();
    assert_eq!(e.field(), Some("specs[1].pools[0].units[\"tokens\"]"));
}
