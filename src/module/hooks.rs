//! The five hooks of the `virtual` transport, as the core calls them
//! (through the trampolines of `crate::opensips::evi`).

#![forbid(unsafe_code)]

use std::ptr::null_mut;

use super::deliver;
use super::vsock::SockRef;
use crate::opensips::event::Event;
use crate::opensips::evi::{CoreSock, Hooks};
use crate::opensips::evi_reply_sock;
use crate::opensips::log::log;
use crate::opensips::str::{self, str_};
use crate::socket;
use crate::text::Quoted;

pub struct Virtual;

impl Hooks for Virtual {
    fn parse(address: &[u8]) -> *mut evi_reply_sock {
        match SockRef::open(address) {
            Ok(sock) => {
                // the replay process claims what waits for it
                if super::restore::waiting() {
                    super::shared::ring();
                }
                sock.into_core()
            }
            Err(e) => {
                log!(ERR, "refusing virtual socket '{}': {e}", Quoted(address));
                null_mut()
            }
        }
    }

    fn print(sock: CoreSock<'_>) -> str_ {
        // the text lives as long as the core's reference
        SockRef::of(sock).map_or(str::EMPTY, |v| v.address())
    }

    fn matches(a: CoreSock<'_>, b: CoreSock<'_>) -> bool {
        let (Some(a), Some(b)) = (SockRef::of(a), SockRef::of(b)) else {
            return false;
        };
        let same = socket::same_socket(
            a.policy,
            a.key(),
            &a.tokens(),
            b.policy,
            b.key(),
            &b.tokens(),
        );
        if same && a.spool != b.spool {
            // the option is not identity: a refresh keeps the spool the
            // subscription was made with
            log!(DBG, "'virtual:{}' keeps its spool", Quoted(a.text()));
        }
        same
    }

    fn free(sock: CoreSock<'_>) {
        // the subscription's reference: the block goes with the last one;
        // what its spool holds is dropped now (counted)
        if let Some(sock) = SockRef::take(sock) {
            super::spool::close(&sock);
        }
    }

    fn raise(event: Event<'_>, sock: CoreSock<'_>) -> bool {
        match SockRef::of(sock) {
            Some(sock) => deliver::raise(event, sock),
            None => {
                log!(ERR, "raise on a socket that is not virtual");
                false
            }
        }
    }
}
