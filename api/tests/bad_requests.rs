//! Property tests of the api's request validation: arbitrary requests, sent straight to the service
//! (over the in-memory store; no network needed to check validation), never panic, and every rejection is
//! INVALID_ARGUMENT or NOT_FOUND with a message saying what is wrong.

use std::str::FromStr;
use std::sync::Arc;

use proptest::prelude::*;
use tickfleet_api::{Api, ApiMetrics};
use tickfleet_proto::Tick;
use tickfleet_proto::v1::get_moving_average_request::Over;
use tickfleet_proto::v1::tick_service_server::TickService;
use tickfleet_proto::v1::{
    BatchGetLatestRequest, GetCandlesRequest, GetLatestRequest, GetMovingAverageRequest,
    ListTicksRequest,
};
use tickfleet_service::CancellationToken;
use tickfleet_store::{MemoryStore, TickStore};
use tonic::{Code, Request, Status};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// An api over a store holding 50 ticks of asset "A".
fn api(rt: &tokio::runtime::Runtime) -> Api {
    let store = Arc::new(MemoryStore::new());
    let ticks: Vec<Tick> = (1..=50)
        .map(|i| Tick {
            asset_id: "A".into(),
            price: rust_decimal::Decimal::from_str("100.5").unwrap(),
            size: Some(rust_decimal::Decimal::ONE),
            event_time_ns: 1_700_000_000_000_000_000 + i * 1_000_000_000,
            seq: i as u64,
            source: "t".into(),
        })
        .collect();
    rt.block_on(store.write_batch(&ticks)).unwrap();
    let metrics = ApiMetrics::new(&prometheus::Registry::new()).unwrap();
    Api::new(store, metrics, CancellationToken::new())
}

/// Ok, or a client error that explains itself — never an internal error.
fn acceptable<T>(result: Result<T, Status>) -> Result<(), TestCaseError> {
    if let Err(status) = result {
        prop_assert!(
            matches!(status.code(), Code::InvalidArgument | Code::NotFound),
            "unexpected code {:?}: {}",
            status.code(),
            status.message()
        );
        prop_assert!(
            !status.message().is_empty(),
            "a rejection without a message"
        );
    }
    Ok(())
}

fn asset() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("A".to_string()),
        Just(String::new()),
        ".{0,40}",
        "[{}| \\t]{1,3}"
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn list_ticks(asset in asset(), from in any::<Option<i64>>(), to in any::<Option<i64>>(),
                  limit in any::<u32>(), token in prop_oneof![Just(String::new()), ".{0,60}"]) {
        let rt = runtime();
        let api = api(&rt);
        let request = ListTicksRequest { asset_id: asset, from_ns: from, to_ns: to, limit, page_token: token };
        acceptable(rt.block_on(api.list_ticks(Request::new(request))))?;
    }

    #[test]
    fn candles(asset in asset(), interval in prop_oneof![Just("1m".to_string()), ".{0,12}", "[0-9]{1,20}[a-z]{0,2}"],
               from in any::<Option<i64>>(), to in any::<Option<i64>>()) {
        let rt = runtime();
        let api = api(&rt);
        let request = GetCandlesRequest { asset_id: asset, interval, from_ns: from, to_ns: to };
        acceptable(rt.block_on(api.get_candles(Request::new(request))))?;
    }

    #[test]
    fn moving_average(asset in asset(), points in any::<u32>(), window in ".{0,12}", by_points in any::<bool>(),
                      unset in any::<bool>()) {
        let rt = runtime();
        let api = api(&rt);
        let over = if by_points { Over::Points(points) } else { Over::Window(window) };
        let over = (!unset).then_some(over);
        let request = GetMovingAverageRequest { asset_id: asset, over };
        acceptable(rt.block_on(api.get_moving_average(Request::new(request))))?;
    }

    #[test]
    fn latest(asset in asset(), many in proptest::collection::vec(asset(), 0..20)) {
        let rt = runtime();
        let api = api(&rt);
        acceptable(rt.block_on(api.get_latest(Request::new(GetLatestRequest { asset_id: asset }))))?;
        acceptable(rt.block_on(api.batch_get_latest(Request::new(BatchGetLatestRequest { asset_ids: many }))))?;
    }
}
