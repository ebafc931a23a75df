//! A QMP session (QEMU's `monitor/qmp.c`, `qapi/qmp-dispatch.c`,
//! `monitor/qmp-cmds-control.c`): the greeting, capabilities negotiation, request checks,
//! dispatch to [`crate::monitor::qmp_cmds`], replies that echo the request's `id`, and the
//! client's events.
//!
//! Each client has its own session thread (reading and executing) and writer thread; a
//! client that sends garbage gets QEMU's errors, one that sends an oversized message gets
//! an error and the rest of the message skipped, one that disconnects just ends its
//! session. None of it reaches the VM or another client.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::monitor::chardev::Connection;
use crate::monitor::client::{register_client, run_deferred, spawn_writer, wait_dispatch, Outbox};
use crate::monitor::info::version_info;
use crate::monitor::json::{self, Message, Splitter, MAX_MESSAGE};
use crate::monitor::qapi::{
    check_args, CommandCtx, Deferred, QmpError, VmContext, QMP_CAPABILITIES_ARGS,
};
use crate::monitor::qmp_cmds;

/// The greeting a client gets on connection.
pub fn greeting(oob_offered: bool) -> Value {
    let caps: Vec<&str> = if oob_offered { vec!["oob"] } else { vec![] };
    json!({"QMP": {"version": version_info(), "capabilities": caps}})
}

/// One client's protocol state.
pub struct QmpSession<'a> {
    vm: &'a VmContext,
    /// Capabilities negotiated: commands may run, events flow.
    negotiated: bool,
    /// Whether `oob` is offered (sockets) and enabled.
    oob_offered: bool,
    oob_enabled: bool,
    /// The descriptors the client passed, for `getfd`.
    fds: Option<crate::monitor::fds::FdQueue>,
}

/// A reply and what to do once it is sent.
pub struct Reply {
    /// The reply, if any.
    pub message: Value,
    /// An action for after the reply.
    pub deferred: Option<Deferred>,
}

impl<'a> QmpSession<'a> {
    /// A session in capabilities-negotiation mode.
    pub fn new(vm: &'a VmContext, oob_offered: bool) -> Self {
        QmpSession {
            vm,
            negotiated: false,
            oob_offered,
            oob_enabled: false,
            fds: None,
        }
    }

    /// Lets `getfd` name the descriptors the client passes on `fds`.
    pub fn with_fds(mut self, fds: Option<crate::monitor::fds::FdQueue>) -> Self {
        self.fds = fds;
        self
    }

    /// Whether `qmp_capabilities` has succeeded.
    pub fn negotiated(&self) -> bool {
        self.negotiated
    }

    /// Handles one message from the splitter.
    pub fn handle(&mut self, message: Message) -> Reply {
        let request = match message {
            Message::TooLarge => {
                return self.error_reply(
                    QmpError::BadInput(format!(
                        "JSON parse error, message exceeds the limit of {MAX_MESSAGE} bytes"
                    )),
                    None,
                )
            }
            Message::Text(text) => match json::parse(&text) {
                Ok(v) => v,
                Err(desc) => return self.error_reply(QmpError::BadInput(desc), None),
            },
        };
        self.handle_request(&request)
    }

    fn error_reply(&self, err: QmpError, id: Option<Value>) -> Reply {
        let mut rsp = Map::new();
        rsp.insert("error".into(), err.to_json());
        if let Some(id) = id {
            rsp.insert("id".into(), id);
        }
        Reply {
            message: Value::Object(rsp),
            deferred: None,
        }
    }

    /// Handles one parsed request (QEMU's `qmp_dispatch`).
    pub fn handle_request(&mut self, request: &Value) -> Reply {
        let id = request.as_object().and_then(|o| o.get("id")).cloned();
        let mut ctx = CommandCtx::new(self.vm);
        ctx.fds = self.fds.clone();
        let result = self.dispatch(&ctx, request);
        let mut rsp = Map::new();
        match result {
            Ok(v) => {
                rsp.insert("return".into(), v);
            }
            Err(e) => {
                rsp.insert("error".into(), e.to_json());
            }
        }
        if let Some(id) = id {
            rsp.insert("id".into(), id);
        }
        Reply {
            message: Value::Object(rsp),
            deferred: ctx.deferred.get(),
        }
    }

    /// QEMU's `qmp_dispatch_check_obj`: the request's shape. Returns the command name,
    /// whether it came as `exec-oob`, and the arguments.
    fn check_obj<'r>(
        &self,
        request: &'r Value,
    ) -> Result<(&'r str, bool, Map<String, Value>), QmpError> {
        let dict = request
            .as_object()
            .ok_or_else(|| QmpError::BadInput("QMP input must be a JSON object".into()))?;
        let mut exec: Option<(&str, &str)> = None;
        let mut args = Map::new();
        for (key, value) in dict {
            match key.as_str() {
                "execute" | "exec-oob" if key == "execute" || self.oob_enabled => {
                    let name = value.as_str().ok_or_else(|| {
                        QmpError::BadInput(format!("QMP input member '{key}' must be a string"))
                    })?;
                    if let Some((other, _)) = exec {
                        return Err(QmpError::BadInput(format!(
                            "QMP input member '{key}' clashes with '{other}'"
                        )));
                    }
                    exec = Some((key.as_str(), name));
                }
                "arguments" => {
                    args = value.as_object().cloned().ok_or_else(|| {
                        QmpError::BadInput("QMP input member 'arguments' must be an object".into())
                    })?;
                }
                "id" => {}
                _ => {
                    return Err(QmpError::BadInput(format!(
                        "QMP input member '{key}' is unexpected"
                    )))
                }
            }
        }
        let (key, name) =
            exec.ok_or_else(|| QmpError::BadInput("QMP input lacks member 'execute'".into()))?;
        Ok((name, key == "exec-oob", args))
    }

    fn dispatch(&mut self, ctx: &CommandCtx, request: &Value) -> Result<Value, QmpError> {
        let (name, oob, args) = self.check_obj(request)?;
        if name == "qmp_capabilities" {
            if oob {
                return Err(QmpError::NoOob(name.into()));
            }
            check_args(&args, QMP_CAPABILITIES_ARGS)?;
            return self.qmp_capabilities(&args);
        }
        let command = qmp_cmds::find_command(name);
        if !self.negotiated {
            // QEMU's negotiation mode knows only qmp_capabilities; its "not found" says
            // what is expected instead.
            return Err(QmpError::NegotiationExpected);
        }
        let command = command.ok_or_else(|| QmpError::CommandNotFound(name.into()))?;
        if oob {
            return Err(QmpError::NoOob(name.into()));
        }
        check_args(&args, command.args)?;
        (command.run)(ctx, &args)
    }

    /// QEMU's `qmp_capabilities`.
    fn qmp_capabilities(&mut self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        if self.negotiated {
            return Err(QmpError::AlreadyNegotiated);
        }
        let enable: Vec<&str> = args
            .get("enable")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let unavailable: Vec<&str> = enable
            .iter()
            .copied()
            .filter(|&c| !(c == "oob" && self.oob_offered))
            .collect();
        if !unavailable.is_empty() {
            return Err(QmpError::CapabilityUnavailable(unavailable.join(", ")));
        }
        self.oob_enabled = enable.contains(&"oob");
        self.negotiated = true;
        Ok(json!({}))
    }
}

/// Serves one QMP client until it disconnects.
pub fn run_session(vm: &Arc<VmContext>, conn: Connection) {
    let Connection {
        mut reader,
        writer,
        shutdown,
        is_socket,
        fds,
    } = conn;
    let outbox = Outbox::new(shutdown);
    spawn_writer("QMP", &outbox, writer);
    register_client(&outbox);
    outbox.send(format!("{}\r\n", json::to_string(&greeting(is_socket))));

    let mut session = QmpSession::new(vm, is_socket).with_fds(fds);
    let mut splitter = Splitter::new();
    let mut buf = vec![0u8; 64 << 10];
    'read: loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        for message in splitter.feed(&buf[..n]) {
            wait_dispatch();
            let was_negotiated = session.negotiated();
            let reply = session.handle(message);
            let text = format!("{}\r\n", json::to_string(&reply.message));
            if !outbox.send_then(text, !was_negotiated && session.negotiated()) {
                break 'read;
            }
            if let Some(action) = reply.deferred {
                run_deferred(vm, action, &outbox);
            }
        }
    }
    // Whatever is still queued (an event) is dropped with the connection.
    outbox.flush(Duration::from_millis(100));
    outbox.close();
}
