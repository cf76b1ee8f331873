//! The future the request steps above the upstream return.
//!
//! Most answers on the hot path are made without waiting: a fresh cache hit,
//! a refusal, a preflight. Such an answer travels back up through the steps as
//! a value, each step adjusting it on the way (headers, log fields, metrics)
//! at once, with no allocation and no poll. An answer that has to wait (the
//! upstream, a Redis lease) is one boxed future, which each step above wraps
//! as usual. Every step keeps the ordinary tower `Service` shape; only its
//! `Future` type is this one.

use crate::error::{Body, GatewayError};
use futures_util::future::{BoxFuture, FutureExt};
use http::{Request, Response};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A request step that answers through [`StepFuture`] (every step from the
/// access log down to the cache); `E` is the error it passes up.
pub trait Step<E = GatewayError>:
    tower::Service<
        Request<Body>,
        Response = Response<Body>,
        Error = E,
        Future = StepFuture<Response<Body>, E>,
    >
{
}

impl<S, E> Step<E> for S where
    S: tower::Service<
            Request<Body>,
            Response = Response<Body>,
            Error = E,
            Future = StepFuture<Response<Body>, E>,
        >
{
}

/// An answer that is already there, or one still to come.
pub enum StepFuture<T, E> {
    /// `None` once it has been taken by a poll.
    Ready(Option<Result<T, E>>),
    Waiting(BoxFuture<'static, Result<T, E>>),
}

impl<T, E> StepFuture<T, E>
where
    T: Send + 'static,
    E: Send + 'static,
{
    pub fn ready(result: Result<T, E>) -> Self {
        StepFuture::Ready(Some(result))
    }

    pub fn ok(value: T) -> Self {
        Self::ready(Ok(value))
    }

    pub fn err(error: E) -> Self {
        Self::ready(Err(error))
    }

    /// An answer that has to wait for `fut`.
    pub fn wait(fut: impl Future<Output = Result<T, E>> + Send + 'static) -> Self {
        StepFuture::Waiting(fut.boxed())
    }

    /// Applies `f` to the answer: now if it is there, otherwise when it comes.
    pub fn map<U, E2>(
        self,
        f: impl FnOnce(Result<T, E>) -> Result<U, E2> + Send + 'static,
    ) -> StepFuture<U, E2>
    where
        U: Send + 'static,
        E2: Send + 'static,
    {
        match self {
            StepFuture::Ready(Some(result)) => StepFuture::Ready(Some(f(result))),
            StepFuture::Ready(None) => StepFuture::Ready(None),
            StepFuture::Waiting(fut) => StepFuture::Waiting(fut.map(f).boxed()),
        }
    }

    /// [`StepFuture::map`] of the successful answer only.
    pub fn map_ok<U>(self, f: impl FnOnce(T) -> U + Send + 'static) -> StepFuture<U, E>
    where
        U: Send + 'static,
    {
        self.map(|r| r.map(f))
    }
}

// The answer is moved out, never pinned in place.
impl<T, E> Unpin for StepFuture<T, E> {}

impl<T, E> Future for StepFuture<T, E> {
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            StepFuture::Ready(result) => match result.take() {
                Some(r) => Poll::Ready(r),
                None => panic!("StepFuture polled after it completed"),
            },
            StepFuture::Waiting(fut) => fut.as_mut().poll(cx),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_ready_answer_is_mapped_at_once_and_a_waiting_one_when_it_comes() {
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r = ran.clone();
        let ready = StepFuture::<u32, ()>::ok(2).map_ok(move |v| {
            r.store(true, std::sync::atomic::Ordering::SeqCst);
            v * 10
        });
        assert!(ran.load(std::sync::atomic::Ordering::SeqCst));
        assert!(matches!(ready, StepFuture::Ready(Some(Ok(20)))));
        assert_eq!(ready.await, Ok(20));

        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let waiting = StepFuture::<u32, ()>::wait(async move { Ok(rx.await.unwrap()) })
            .map(|r| r.map(|v| v + 1).map_err(|_: ()| "never"));
        assert!(matches!(waiting, StepFuture::Waiting(_)));
        tx.send(41).unwrap();
        assert_eq!(waiting.await, Ok(42));
        assert_eq!(StepFuture::<u32, &str>::err("no").await, Err("no"));
    }
}
