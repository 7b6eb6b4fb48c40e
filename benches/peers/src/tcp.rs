//! The plain TCP side of the head-of-line run: one connection, frames interleaved by
//! the writer (an urgent frame goes out before the next bulk frame), so any wait an
//! urgent request sees comes from TCP's single ordered byte stream.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::bail;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::stats::{self, Echo, Figures};
use crate::{Hol, PAYLOAD_BYTES};

const BULK: u8 = 1;
const URGENT: u8 = 2;
/// Bulk frames are cut this small so an urgent frame can slip between two of them
/// (HTTP/2's default frame size).
const BULK_FRAME: usize = 16 * 1024;
/// The largest frame either side accepts.
const MAX_FRAME: usize = 64 * 1024;

async fn write_frame<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    kind: u8,
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = [0u8; 5];
    head[0] = kind;
    head[1..].copy_from_slice(&(body.len() as u32).to_be_bytes());
    w.write_all(&head).await?;
    w.write_all(body).await
}

/// Reads one frame into `body`; `None` at a clean end of stream.
async fn read_frame<R: AsyncReadExt + Unpin>(
    r: &mut R,
    body: &mut Vec<u8>,
) -> anyhow::Result<Option<u8>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        bail!("a frame of {len} bytes is over the {MAX_FRAME}-byte limit");
    }
    body.resize(len, 0);
    r.read_exact(body).await?;
    Ok(Some(head[0]))
}

/// Serves until killed: bulk frames are read and dropped, urgent ones echoed.
pub async fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    crate::ready(listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut r = BufReader::with_capacity(256 * 1024, r);
            let mut body = Vec::with_capacity(MAX_FRAME);
            while let Ok(Some(kind)) = read_frame(&mut r, &mut body).await {
                if kind == URGENT && write_frame(&mut w, URGENT, &body).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// An urgent frame handed to the writer, and its echo from the reader.
struct TcpEcho {
    urgent_tx: mpsc::Sender<Vec<u8>>,
    reply_rx: mpsc::Receiver<Vec<u8>>,
}

impl Echo for TcpEcho {
    async fn echo(&mut self) -> anyhow::Result<usize> {
        self.urgent_tx.send(vec![9u8; PAYLOAD_BYTES]).await?;
        match self.reply_rx.recv().await {
            Some(back) => Ok(back.len()),
            None => bail!("the connection closed"),
        }
    }
}

/// Urgent requests every interval on the connection the bulk transfer keeps full.
pub async fn hol(server: SocketAddr, run: &Hol) -> anyhow::Result<Figures> {
    let stream = TcpStream::connect(server).await?;
    stream.set_nodelay(true)?;
    let (mut r, mut w) = stream.into_split();
    let (urgent_tx, mut urgent_rx) = mpsc::channel::<Vec<u8>>(1);
    let (reply_tx, reply_rx) = mpsc::channel::<Vec<u8>>(1);
    let stop = Arc::new(AtomicBool::new(false));
    let sent_bytes = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, sent_bytes) = (stop.clone(), sent_bytes.clone());
        tokio::spawn(async move {
            let chunk = vec![1u8; BULK_FRAME];
            while !stop.load(Ordering::Relaxed) {
                while let Ok(urgent) = urgent_rx.try_recv() {
                    write_frame(&mut w, URGENT, &urgent).await?;
                }
                write_frame(&mut w, BULK, &chunk).await?;
                sent_bytes.fetch_add(BULK_FRAME as u64, Ordering::Relaxed);
            }
            anyhow::Ok(())
        })
    };
    tokio::spawn(async move {
        let mut body = Vec::new();
        while let Ok(Some(_)) = read_frame(&mut r, &mut body).await {
            if reply_tx.send(body.clone()).await.is_err() {
                break;
            }
        }
    });
    let mut echo = TcpEcho {
        urgent_tx,
        reply_rx,
    };
    let figures = stats::under_bulk("tcp", run, &mut echo, &sent_bytes, &stop, writer).await?;
    Ok(figures)
}
