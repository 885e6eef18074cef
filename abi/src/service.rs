//! Declaring a service interface once.
//!
//! [`service_interface!`](crate::service_interface) takes one declaration —
//! the service's id and its operations with their request and reply types —
//! and generates both sides from it:
//!
//! * `Operation`, the operation numbers;
//! * `Server`, a trait with one method per operation, which a service
//!   implements;
//! * `dispatch(&mut impl Server, &Message) -> Message`, which checks and
//!   decodes a call, runs the operation and encodes the reply (unknown
//!   operations, wrong versions and malformed payloads become typed errors);
//! * `client::<op>::request(sequence, &Request) -> Message` and
//!   `client::<op>::reply(&Message, &call) -> Result<Reply, Error>` for
//!   callers.
//!
//! Adding an operation is one line in the declaration: the trait grows a
//! method (so every server must implement it, or fail to build), and the
//! client and dispatcher follow. Request and reply types are zerocopy
//! structs whose sizes are asserted at compile time to fit a message.

/// Declares a service interface; see the [module documentation](self).
///
/// ```
/// use moat_abi::service_interface;
/// use moat_abi::services::Empty;
/// # fn main() { check() }
/// service_interface! {
///     /// An echo service.
///     pub mod echo: id = 9 {
///         /// Returns its argument.
///         1 => fn echo(u64) -> u64;
///         2 => fn nothing(Empty) -> Empty;
///     }
/// }
/// struct Echo;
/// impl echo::Server for Echo {
///     fn echo(&mut self, v: u64) -> Result<u64, moat_abi::Error> { Ok(v) }
///     fn nothing(&mut self, _: Empty) -> Result<Empty, moat_abi::Error> { Ok(Empty) }
/// }
/// # fn check() {
/// let call = echo::client::echo::request(1, &7);
/// let reply = echo::dispatch(&mut Echo, &call);
/// assert_eq!(echo::client::echo::reply(&reply, &call.header), Ok(7));
/// # }
/// ```
#[macro_export]
macro_rules! service_interface {
    (
        $(#[$meta:meta])*
        $vis:vis mod $name:ident : id = $id:literal {
            $( $(#[$opmeta:meta])* $opnum:literal => fn $op:ident($req:ty) -> $rep:ty; )*
        }
    ) => {
        $(#[$meta])*
        $vis mod $name {
            #[allow(unused_imports)]
            use super::*;
            use $crate::ipc::Message;

            /// This service's id.
            pub const SERVICE_ID: u16 = $id;

            /// The operations, by number.
            #[allow(non_camel_case_types)]
            #[derive(Clone, Copy, Debug, PartialEq, Eq)]
            #[repr(u16)]
            pub enum Operation {
                $( $op = $opnum, )*
            }

            impl Operation {
                /// Every operation.
                pub const ALL: &'static [Operation] = &[ $( Operation::$op, )* ];

                /// The operation with this number, if declared.
                pub const fn from_u16(v: u16) -> Option<Self> {
                    match v {
                        $( $opnum => Some(Operation::$op), )*
                        _ => None,
                    }
                }
            }

            $(
                const _: () = assert!(core::mem::size_of::<$req>() <= $crate::ipc::PAYLOAD_SIZE);
                const _: () = assert!(core::mem::size_of::<$rep>() <= $crate::ipc::PAYLOAD_SIZE);
            )*

            /// The server side: one method per operation.
            pub trait Server {
                $( $(#[$opmeta])* fn $op(&mut self, request: $req) -> Result<$rep, $crate::Error>; )*
            }

            /// Checks and decodes `call`, runs the operation on `server`, and
            /// encodes the reply. Never panics on any input.
            pub fn dispatch<S: Server + ?Sized>(server: &mut S, call: &Message) -> Message {
                let mut reply = Message::default();
                reply.header = dispatch_into(server, &call.header, call.body(), &mut reply.payload);
                reply
            }

            /// As [`dispatch`], for callers that keep the message in place: the
            /// request is `header` and `body`, the reply's payload is written to
            /// `reply_payload` and its header returned. Only the reply's
            /// `payload_len` bytes of `reply_payload` are written.
            pub fn dispatch_into<S: Server + ?Sized>(
                server: &mut S,
                header: &$crate::ipc::MessageHeader,
                body: &[u8],
                reply_payload: &mut [u8; $crate::ipc::PAYLOAD_SIZE],
            ) -> $crate::ipc::MessageHeader {
                #[allow(unused_imports)]
                use $crate::zerocopy::IntoBytes;
                let refuse = |e: $crate::Error| $crate::ipc::MessageHeader::reply_to(header, Err(e), 0);
                if let Err(e) = $crate::ipc::check_call_header(header) {
                    return refuse(e.to_error());
                }
                if header.service != SERVICE_ID {
                    return refuse($crate::Error::InvalidParameters);
                }
                match Operation::from_u16(header.operation) {
                    $(
                        Some(Operation::$op) => match $crate::ipc::decode_request::<$req>(body) {
                            Ok(request) => match server.$op(request) {
                                Ok(reply) => {
                                    let bytes = reply.as_bytes();
                                    reply_payload[..bytes.len()].copy_from_slice(bytes);
                                    $crate::ipc::MessageHeader::reply_to(header, Ok(()), bytes.len() as u32)
                                }
                                Err(e) => refuse(e),
                            },
                            Err(e) => refuse(e.to_error()),
                        },
                    )*
                    None => refuse($crate::Error::NotSupported),
                }
            }

            /// The client side: one module per operation.
            pub mod client {
                #[allow(unused_imports)]
                use super::*;
                $(
                    $(#[$opmeta])*
                    pub mod $op {
                        #[allow(unused_imports)]
                        use super::super::*;
                        use $crate::ipc::Message;

                        /// The call message.
                        pub fn request(sequence: u32, request: &$req) -> Message {
                            use $crate::zerocopy::IntoBytes;
                            // Fits: asserted at compile time above.
                            Message::call(SERVICE_ID, $opnum, sequence, request.as_bytes())
                                .unwrap_or_default()
                        }

                        /// Checks `reply` against `call` and decodes it.
                        pub fn reply(
                            reply: &Message,
                            call: &$crate::ipc::MessageHeader,
                        ) -> Result<$rep, $crate::Error> {
                            match reply.check_reply(call) {
                                Ok(Ok(body)) => $crate::ipc::decode::<$rep>(body).map_err(|e| e.to_error()),
                                Ok(Err(e)) => Err(e),
                                Err(e) => Err(e.to_error()),
                            }
                        }
                    }
                )*
            }
        }
    };
}
