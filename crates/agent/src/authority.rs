//! Any `:authority` on the Unix sockets (DESIGN §2.3, issue 12 break 5).
//!
//! A gRPC C-core client (Python `grpcio`, Envoy whose SDS source is
//! `google_grpc`) dialling `unix:///dir/socket` sends the percent-encoded
//! path as its `:authority` (`dir%2Fsocket`). That is no URI authority, and
//! h2 resets such a stream with PROTOCOL_ERROR before any handler runs;
//! pilot-agent's and SPIRE's servers (grpc-go) do not look at it. On a Unix
//! socket the authority names nothing, so the agent puts every client's
//! HTTP/2 through [`any_authority`]: a relay that decodes each header block
//! and hands it on re-encoded, with an `:authority` that is not a valid URI
//! authority replaced by `localhost` (what grpc-go sends for `unix:`).
//! Everything else passes byte for byte. Re-encoded blocks use literals
//! without indexing, so the server's HPACK table stays empty and in step.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tracing::debug;

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame we emit: the HTTP/2 default SETTINGS_MAX_FRAME_SIZE,
/// which the agent's servers keep.
const MAX_FRAME: usize = 16_384;
/// The largest header block accepted from a client (h2's default list size).
const MAX_BLOCK: usize = 64 * 1024;
/// What replaces an authority that is not one.
pub const UNIX_AUTHORITY: &str = "localhost";

/// Relays `conn` (a client's HTTP/2 connection) to the returned stream, which
/// the gRPC server reads, rewriting unusable `:authority` values on the way.
pub fn any_authority<S>(conn: S) -> DuplexStream
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (server_side, relay_side) = tokio::io::duplex(64 * 1024);
    let (mut client_rd, mut client_wr) = tokio::io::split(conn);
    let (mut relay_rd, mut relay_wr) = tokio::io::split(relay_side);
    tokio::spawn(async move {
        let inbound = async {
            let r = rewrite(&mut client_rd, &mut relay_wr).await;
            if let Err(e) = &r {
                debug!(error = %e, "unix socket: client stream ended");
            }
            let _ = relay_wr.shutdown().await;
        };
        let outbound = async {
            let _ = tokio::io::copy(&mut relay_rd, &mut client_wr).await;
            let _ = client_wr.shutdown().await;
        };
        tokio::join!(inbound, outbound);
    });
    server_side
}

fn invalid(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

/// Copies `from` to `to` frame by frame, re-encoding header blocks.
async fn rewrite<R, W>(from: &mut R, to: &mut W) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; PREFACE.len()];
    from.read_exact(&mut preface).await?;
    to.write_all(&preface).await?;
    if preface != PREFACE {
        // Not HTTP/2 prior knowledge: let the server say so.
        tokio::io::copy(from, to).await?;
        return Ok(());
    }
    let mut decoder = hpack::Decoder::new();
    // An open header block: stream, HEADERS flags, priority bytes, fragment.
    let mut open: Option<(u32, u8, Vec<u8>, Vec<u8>)> = None;
    loop {
        let mut head = [0u8; 9];
        match from.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let kind = head[3];
        let flags = head[4];
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        if len > MAX_BLOCK {
            return Err(invalid(format!("frame of {len} bytes")));
        }
        let mut payload = vec![0u8; len];
        from.read_exact(&mut payload).await?;
        match (kind, open.as_mut()) {
            (HEADERS, None) => {
                let mut body = payload.as_slice();
                if flags & PADDED != 0 {
                    let pad = *body.first().ok_or_else(|| invalid("empty padded".into()))? as usize;
                    if 1 + pad > body.len() {
                        return Err(invalid("bad padding".into()));
                    }
                    body = &body[1..body.len() - pad];
                }
                let mut priority = Vec::new();
                if flags & PRIORITY != 0 {
                    if body.len() < 5 {
                        return Err(invalid("short priority".into()));
                    }
                    priority = body[..5].to_vec();
                    body = &body[5..];
                }
                open = Some((stream, flags, priority, body.to_vec()));
            }
            (CONTINUATION, Some((open_stream, _, _, block))) if *open_stream == stream => {
                block.extend_from_slice(&payload);
                if block.len() > MAX_BLOCK {
                    return Err(invalid("header block too large".into()));
                }
            }
            (_, Some(_)) => {
                // A protocol error: the server will say so; stop rewriting.
                return Err(invalid(format!("frame type {kind} inside a header block")));
            }
            (_, None) => {
                to.write_all(&head).await?;
                to.write_all(&payload).await?;
                continue;
            }
        }
        let ended = (kind == HEADERS || kind == CONTINUATION) && flags & END_HEADERS != 0;
        if ended && let Some((stream, first_flags, priority, block)) = open.take() {
            let headers = decoder
                .decode(&block)
                .map_err(|e| invalid(format!("HPACK: {e:?}")))?;
            let block = reencode(headers);
            write_block(to, stream, first_flags, &priority, &block).await?;
        }
    }
}

/// Encodes `headers` as literals without indexing, fixing `:authority`.
fn reencode(headers: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, mut value) in headers {
        if name == b":authority" && http::uri::Authority::try_from(value.as_slice()).is_err() {
            debug!(
                authority = %String::from_utf8_lossy(&value),
                "unix socket: :authority replaced by {UNIX_AUTHORITY}"
            );
            value = UNIX_AUTHORITY.as_bytes().to_vec();
        }
        // Literal header field without indexing, new name (RFC 7541 §6.2.2).
        out.push(0);
        for s in [&name, &value] {
            out.extend(hpack::encoder::encode_integer(s.len(), 7));
            out.extend_from_slice(s);
        }
    }
    out
}

/// A HEADERS frame (keeping END_STREAM and the priority) and as many
/// CONTINUATION frames as `block` needs.
async fn write_block<W: AsyncWrite + Unpin>(
    to: &mut W,
    stream: u32,
    first_flags: u8,
    priority: &[u8],
    block: &[u8],
) -> std::io::Result<()> {
    let first_room = MAX_FRAME - priority.len();
    let (first, mut rest) = block.split_at(block.len().min(first_room));
    let mut flags = first_flags & (END_STREAM | PRIORITY);
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    write_frame(to, HEADERS, flags, stream, &[priority, first]).await?;
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME));
        rest = tail;
        let flags = if rest.is_empty() { END_HEADERS } else { 0 };
        write_frame(to, CONTINUATION, flags, stream, &[chunk]).await?;
    }
    Ok(())
}

async fn write_frame<W: AsyncWrite + Unpin>(
    to: &mut W,
    kind: u8,
    flags: u8,
    stream: u32,
    parts: &[&[u8]],
) -> std::io::Result<()> {
    let len = parts.iter().map(|p| p.len()).sum::<usize>() as u32;
    let mut frame = Vec::with_capacity(9 + len as usize);
    frame.extend_from_slice(&len.to_be_bytes()[1..]);
    frame.push(kind);
    frame.push(flags);
    frame.extend_from_slice(&stream.to_be_bytes());
    for p in parts {
        frame.extend_from_slice(p);
    }
    to.write_all(&frame).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(block: &[u8]) -> Vec<(String, String)> {
        hpack::Decoder::new()
            .decode(block)
            .unwrap()
            .into_iter()
            .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
            .collect()
    }

    #[test]
    fn a_path_as_authority_becomes_localhost_and_a_good_one_stays() {
        let bad = reencode(vec![
            (b":authority".to_vec(), b"tmp%2Fdir%2Fapi.sock".to_vec()),
            (
                b":path".to_vec(),
                b"/SpiffeWorkloadAPI/FetchX509SVID".to_vec(),
            ),
        ]);
        assert_eq!(
            decode(&bad),
            vec![
                (":authority".into(), "localhost".into()),
                (":path".into(), "/SpiffeWorkloadAPI/FetchX509SVID".into())
            ]
        );
        let good = reencode(vec![(b":authority".to_vec(), b"agent:15000".to_vec())]);
        assert_eq!(
            decode(&good),
            vec![(":authority".into(), "agent:15000".into())]
        );
    }

    #[tokio::test]
    async fn big_blocks_are_split_and_other_frames_pass_unchanged() {
        let (mut client, conn) = tokio::io::duplex(1 << 20);
        let mut server = any_authority(conn);
        let mut enc = hpack::Encoder::new();
        let big = "x".repeat(20_000);
        let headers: Vec<(&[u8], &[u8])> =
            vec![(b":authority", b"a%2Fb"), (b"big", big.as_bytes())];
        let block = enc.encode(headers);
        let mut input = PREFACE.to_vec();
        // SETTINGS (empty), then HEADERS without END_HEADERS + CONTINUATION.
        input.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        let (a, b) = block.split_at(100);
        let mut frame = |kind: u8, flags: u8, body: &[u8]| {
            input.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
            input.extend_from_slice(&[kind, flags, 0, 0, 0, 1]);
            input.extend_from_slice(body);
        };
        frame(HEADERS, END_STREAM, a);
        frame(CONTINUATION, END_HEADERS, b);
        client.write_all(&input).await.unwrap();
        client.shutdown().await.unwrap();
        let mut out = Vec::new();
        server.read_to_end(&mut out).await.unwrap();
        assert_eq!(&out[..PREFACE.len() + 9], &input[..PREFACE.len() + 9]);
        let mut rest = &out[PREFACE.len() + 9..];
        let mut block = Vec::new();
        let mut kinds = Vec::new();
        while !rest.is_empty() {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            assert!(len <= MAX_FRAME);
            kinds.push((rest[3], rest[4]));
            block.extend_from_slice(&rest[9..9 + len]);
            rest = &rest[9 + len..];
        }
        assert!(kinds.len() >= 2, "{kinds:?}");
        assert_eq!(kinds[0], (HEADERS, END_STREAM));
        assert_eq!(kinds[kinds.len() - 1], (CONTINUATION, END_HEADERS));
        let decoded = decode(&block);
        assert_eq!(decoded[0], (":authority".into(), "localhost".into()));
        assert_eq!(decoded[1].1.len(), 20_000);
    }
}
