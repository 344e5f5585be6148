//! A baseline on Redis without dingo: the `redis` crate alone making one request-reply at a
//! time with plain commands (`LPUSH` a request, a responder thread `BRPOP`s it and `LPUSH`es
//! the reply, the caller `BRPOP`s that: four commands per call), so the sequential figure has
//! a same-run reference on the same server. It keeps none of dingo's guarantees: a responder
//! that dies loses the request it popped.

use std::time::{Duration, Instant};

use crate::{Measure, Outcome};

fn error(e: impl std::fmt::Display) -> dingo::Error {
    dingo::Error::Broker(dingo::BrokerError::new(dingo::BrokerErrorKind::Other, e.to_string()))
}

pub(crate) fn request_reply(url: &str, requests: u64) -> Outcome {
    let client = redis::Client::open(url).map_err(error)?;
    let mut caller = client.get_connection().map_err(error)?;
    let mut responding = client.get_connection().map_err(error)?;
    let name = format!("dingo-bench-raw-{}-{}", std::process::id(), dingo::IdMaker::next_id(&dingo::UuidV7));
    let (request_list, reply_list) = (format!("{name}:requests"), format!("{name}:replies"));
    let (requests_key, replies_key) = (request_list.clone(), reply_list.clone());
    let responder = std::thread::spawn(move || -> Result<(), dingo::Error> {
        for _ in 0..requests {
            let (_, request): (String, Vec<u8>) =
                redis::cmd("BRPOP").arg(&requests_key).arg(5).query(&mut responding).map_err(error)?;
            redis::cmd("LPUSH").arg(&replies_key).arg(request).query::<()>(&mut responding).map_err(error)?;
        }
        Ok(())
    });
    // About the size of a task message of `add(i, 1)`.
    let request = vec![7u8; 90];
    let mut latencies = Vec::with_capacity(requests as usize);
    let start = Instant::now();
    for _ in 0..requests {
        let begin = Instant::now();
        redis::cmd("LPUSH").arg(&request_list).arg(request.as_slice()).query::<()>(&mut caller).map_err(error)?;
        let _: (String, Vec<u8>) = redis::cmd("BRPOP").arg(&reply_list).arg(5).query(&mut caller).map_err(error)?;
        latencies.push(begin.elapsed());
    }
    let rate = requests as f64 / start.elapsed().as_secs_f64();
    responder.join().map_err(|_| error("the responder thread panicked"))??;
    redis::cmd("DEL").arg(&request_list).arg(&reply_list).query::<()>(&mut caller).map_err(error)?;
    latencies.sort();
    let at = |q: f64| latencies.get(((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)).copied();
    Ok(Measure::Latency { p50: at(0.50).unwrap_or(Duration::ZERO), p99: at(0.99).unwrap_or(Duration::ZERO), rate })
}
