//! Calls that gave no value, as HTTP replies.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dingo::TaskErrorKind;
use serde::Serialize;

/// A call that gave no value, as the reply `{"error": message, "kind": kind}`.
///
/// | status | when | kind |
/// | --- | --- | --- |
/// | 422 | the task returned `Err` | `failed` |
/// | 504 | no result within the deadline (the call is cancelled), or the task ran past its time limit or expired | `timeout`, `time limit`, `expired` |
/// | 409 | the call was cancelled (by another client) | `cancelled` |
/// | 503 | the queue is full (with `Retry-After`), the app closed, or its workers kept dying | `queue full`, `shutdown`, `worker lost` |
/// | 500 | anything else: a panic, a worker that does not know the task, … | the task error's kind, or `internal` |
#[derive(Debug)]
pub struct Failure {
    status: StatusCode,
    kind: String,
    message: String,
}

impl Failure {
    pub(crate) fn new(status: StatusCode, kind: &str, message: impl Into<String>) -> Failure {
        Failure { status, kind: kind.to_owned(), message: message.into() }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The kind, as in the reply (`failed`, `timeout`, …).
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The message, as in the reply.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl From<dingo::Error> for Failure {
    fn from(error: dingo::Error) -> Failure {
        match &error {
            dingo::Error::Task(task) => {
                let status = match task.kind() {
                    TaskErrorKind::Failed => StatusCode::UNPROCESSABLE_ENTITY,
                    TaskErrorKind::TimeLimit | TaskErrorKind::Expired => StatusCode::GATEWAY_TIMEOUT,
                    TaskErrorKind::Cancelled => StatusCode::CONFLICT,
                    TaskErrorKind::Shutdown | TaskErrorKind::WorkerLost => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                Failure::new(status, &task.kind().to_string(), task.message())
            }
            dingo::Error::QueueFull { .. } => {
                Failure::new(StatusCode::SERVICE_UNAVAILABLE, "queue full", error.to_string())
            }
            dingo::Error::Shutdown => Failure::new(StatusCode::SERVICE_UNAVAILABLE, "shutdown", error.to_string()),
            _ => Failure::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", dingo::error::chain(&error)),
        }
    }
}

#[derive(Serialize)]
pub(crate) struct ErrorBody<'a> {
    pub(crate) error: &'a str,
    pub(crate) kind: &'a str,
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: &self.message, kind: &self.kind };
        let mut response = (self.status, Json(body)).into_response();
        if self.kind == "queue full" {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}
