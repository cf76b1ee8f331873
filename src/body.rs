//! Body helpers: an idle timeout on streaming bodies (a client or an upstream
//! that stops sending mid-body must not hold a request forever).

use crate::error::{Body, BodyError};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// The error of a body that went quiet for longer than its timeout.
#[derive(Debug, Clone, Copy)]
pub struct BodyTimeout(pub Duration);

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no body data for {:?}", self.0)
    }
}

impl std::error::Error for BodyTimeout {}

pin_project! {
    /// Fails with [`BodyTimeout`] when no frame arrives for `timeout`;
    /// forwards `is_end_stream` and `size_hint`.
    pub struct IdleTimeout {
        #[pin]
        inner: Body,
        #[pin]
        sleep: Sleep,
        timeout: Duration,
    }
}

impl IdleTimeout {
    pub fn wrap(inner: Body, timeout: Duration) -> Body {
        Self {
            inner,
            sleep: tokio::time::sleep(timeout),
            timeout,
        }
        .boxed_unsync()
    }
}

impl http_body::Body for IdleTimeout {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let mut this = self.project();
        if let Poll::Ready(frame) = this.inner.as_mut().poll_frame(cx) {
            this.sleep.as_mut().reset(Instant::now() + *this.timeout);
            return Poll::Ready(frame);
        }
        if this.sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(BodyError::new(BodyTimeout(*this.timeout)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether an upstream-bound request body waits on its caller (see [`ToUpstream`]).
#[derive(Debug, Default)]
pub struct Upload(std::sync::atomic::AtomicBool);

impl Upload {
    /// The last read of the body waited for the caller to send more (the
    /// upstream is not the one being slow).
    pub fn waiting_on_caller(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn set_waiting_on_caller(&self, waiting: bool) {
        self.0.store(waiting, std::sync::atomic::Ordering::SeqCst);
    }
}

pin_project! {
    /// A caller's request body on its way upstream: data frames only (a
    /// caller's trailers are not forwarded: they could carry anything the
    /// header rules strip), and whether it waits on the caller, so that a
    /// slow upload is not taken for a slow upstream.
    pub struct ToUpstream {
        #[pin]
        inner: Body,
        upload: std::sync::Arc<Upload>,
    }
}

impl ToUpstream {
    pub fn wrap(inner: Body) -> (Body, std::sync::Arc<Upload>) {
        let upload = std::sync::Arc::new(Upload::default());
        let body = Self {
            inner,
            upload: upload.clone(),
        };
        (body.boxed_unsync(), upload)
    }
}

impl http_body::Body for ToUpstream {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let mut this = self.project();
        loop {
            let frame = this.inner.as_mut().poll_frame(cx);
            this.upload.set_waiting_on_caller(frame.is_pending());
            match frame {
                Poll::Ready(Some(Ok(frame))) if !frame.is_data() => continue,
                frame => return frame,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether an error (or anything in its source chain) is of type `T`.
pub fn caused_by<T: std::error::Error + 'static>(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if e.downcast_ref::<T>().is_some() {
            return true;
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use futures_util::stream;
    use http_body::Body as _;
    use http_body_util::StreamBody;

    #[tokio::test(start_paused = true)]
    async fn a_quiet_body_times_out_and_a_steady_one_does_not() {
        let quiet =
            StreamBody::new(stream::pending::<Result<Frame<Bytes>, BodyError>>()).boxed_unsync();
        let mut body = IdleTimeout::wrap(quiet, Duration::from_secs(5));
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(caused_by::<BodyTimeout>(&err));

        let steady = StreamBody::new(stream::iter(vec![
            Ok::<_, BodyError>(Frame::data(Bytes::from_static(b"a"))),
            Ok(Frame::data(Bytes::from_static(b"b"))),
        ]))
        .boxed_unsync();
        let body = IdleTimeout::wrap(steady, Duration::from_secs(5));
        assert_eq!(body.collect().await.unwrap().to_bytes(), "ab");
    }

    #[tokio::test]
    async fn an_upload_says_whether_it_waits_on_the_caller_and_drops_trailers() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BodyError>>(4);
        let caller = StreamBody::new(tokio_stream_from(rx)).boxed_unsync();
        let (mut body, upload) = ToUpstream::wrap(caller);
        assert!(!upload.waiting_on_caller(), "nothing asked yet");
        tx.send(Ok(Frame::data(Bytes::from_static(b"a"))))
            .await
            .unwrap();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "a");
        assert!(
            !upload.waiting_on_caller(),
            "the upstream has the last frame"
        );
        // Nothing more from the caller yet.
        let next = tokio::time::timeout(Duration::from_millis(20), body.frame()).await;
        assert!(next.is_err());
        assert!(upload.waiting_on_caller());
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-team-id", http::HeaderValue::from_static("other"));
        tx.send(Ok(Frame::trailers(trailers))).await.unwrap();
        drop(tx);
        assert!(body.frame().await.is_none(), "trailers are not forwarded");
        assert!(!upload.waiting_on_caller());
    }

    fn tokio_stream_from<T>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    #[tokio::test]
    async fn end_of_stream_is_forwarded() {
        let body = IdleTimeout::wrap(crate::error::empty_body(), Duration::from_secs(1));
        assert!(body.is_end_stream());
    }
}
