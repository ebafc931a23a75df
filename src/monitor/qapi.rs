//! What every monitor command runs with and answers in (QEMU's `qapi/qmp-dispatch.c`,
//! `qapi/qmp-registry.c` and the QAPI error classes): the VM a command sees, its context,
//! its errors, the declared arguments and their checks, the command table's entry type.
//!
//! The lowest layer of the monitor after [`json`](super::json) and
//! [`chardev`](super::chardev): the command implementations, both protocols and their
//! sessions build on it; it depends on no other monitor file.

use std::cell::Cell;

use hw::core::balloon::BalloonError;
use hw::core::machine::{machine_state, MachineState};
use hw::core::runstate::RunStateError;
use qom::ObjectRef;
use serde_json::{json, Map, Value};

/// QMP's `human-monitor-command`: runs an HMP command line (on the CPU `cpu-index`, if
/// given) and returns its output. The HMP layer provides it; the monitor's set-up hands
/// it down in [`VmContext`], so that the QMP commands need not know HMP.
pub type HumanMonitorFn = fn(&CommandCtx, Option<i64>, &str) -> Result<String, QmpError>;

/// What every command sees of the VM.
pub struct VmContext {
    /// `/machine`.
    pub machine: ObjectRef,
    /// `-name`.
    pub name: Option<String>,
    /// `-uuid` (all zeroes without it).
    pub uuid: hw::core::uuid::Uuid,
    /// Runs `human-monitor-command`.
    pub human_monitor: HumanMonitorFn,
}

impl VmContext {
    /// The machine's state.
    pub fn machine_state(&self) -> &MachineState {
        machine_state(&self.machine).expect("machines have a MachineState")
    }
}

/// What a command leaves to do once its reply is queued: requests for the main loop, which
/// may end the process, so the reply must be on its way first (QEMU's main loop handles
/// them after the command returned, too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deferred {
    /// `quit`: end the run (after the reply is flushed, so the client sees it).
    Quit,
    /// `system_reset`: reset (or, with `-no-reboot`, end the run).
    Reset,
}

/// A QMP error: its QAPI class and QEMU's description.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// No command of that name.
    #[error("The command {0} has not been found")]
    CommandNotFound(String),
    /// A command other than `qmp_capabilities` before negotiation.
    #[error("Expecting capabilities negotiation with 'qmp_capabilities'")]
    NegotiationExpected,
    /// `qmp_capabilities` a second time.
    #[error("Capabilities negotiation is already complete, command ignored")]
    AlreadyNegotiated,
    /// `qmp_capabilities` enabling a capability not offered.
    #[error("Capability {0} not available")]
    CapabilityUnavailable(String),
    /// A request that is not a well-formed QMP command, or not JSON.
    #[error("{0}")]
    BadInput(String),
    /// A required argument is missing.
    #[error("Parameter '{0}' is missing")]
    MissingParameter(String),
    /// An argument the command does not take.
    #[error("Parameter '{0}' is unexpected")]
    UnexpectedParameter(String),
    /// An argument of the wrong JSON type.
    #[error("Invalid parameter type for '{name}', expected: {expected}")]
    InvalidParameterType {
        /// The argument.
        name: String,
        /// `string`, `integer`, `boolean`...
        expected: &'static str,
    },
    /// An enum argument with an unknown value.
    #[error("Parameter '{name}' does not accept value '{value}'")]
    InvalidEnumValue {
        /// The argument.
        name: String,
        /// The value given.
        value: String,
    },
    /// `exec-oob` of a command that cannot run out of band.
    #[error("The command {0} does not support OOB")]
    NoOob(String),
    /// A type or object that does not exist.
    #[error("Device '{0}' not found")]
    DeviceNotFound(String),
    /// A class that does not exist.
    #[error("Class '{0}' not found")]
    ClassNotFound(String),

    /// An argument that names the wrong kind of type.
    #[error("Parameter '{name}' expects {expected}")]
    WrongType {
        /// The argument.
        name: &'static str,
        /// What it must name.
        expected: &'static str,
    },
    /// A QOM error (properties, paths).
    #[error(transparent)]
    Qom(#[from] qom::Error),
    /// A run-state change that was refused.
    #[error(transparent)]
    RunState(#[from] RunStateError),
    /// A balloon command without a balloon, or with a bad target.
    #[error(transparent)]
    Balloon(#[from] BalloonError),
    /// `migrate`/`migrate-incoming` refused.
    #[error(transparent)]
    Migrate(#[from] crate::migration::MigrateError),
    /// A command that failed, in QEMU's words (a `GenericError`).
    #[error("{0}")]
    Failed(String),
    /// A feature qomvm has not started, or does not have (`SPICE is not in use`).
    #[error("{0}")]
    NotActive(&'static str),
    /// An argument's value the command refuses (QEMU's `QERR_INVALID_PARAMETER`).
    #[error("Invalid parameter '{0}'")]
    InvalidParameter(&'static str),
}

impl QmpError {
    /// The QAPI error class.
    pub fn class(&self) -> &'static str {
        match self {
            QmpError::CommandNotFound(_)
            | QmpError::NegotiationExpected
            | QmpError::AlreadyNegotiated => "CommandNotFound",
            // QEMU's qom-list-properties reports an unknown class as DeviceNotFound too.
            QmpError::DeviceNotFound(_)
            | QmpError::ClassNotFound(_)
            | QmpError::Qom(qom::Error::PathNotFound(_)) => "DeviceNotFound",
            QmpError::Balloon(BalloonError::NotActivated) | QmpError::NotActive(_) => {
                "DeviceNotActive"
            }
            _ => "GenericError",
        }
    }

    /// The `error` member of a reply.
    pub fn to_json(&self) -> Value {
        json!({"class": self.class(), "desc": self.to_string()})
    }
}

/// The type of a command argument, as the QAPI schema declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgType {
    /// `str`.
    Str,
    /// `bool`.
    Bool,
    /// `int`.
    Int,
    /// `any`.
    Any,
    /// One of the enum's names.
    Enum(&'static QapiEnum),
    /// A list of the enum's names (`['QMPCapability']`).
    EnumList(&'static QapiEnum),
}

/// A QAPI enum type: its name (for the schema) and its values.
#[derive(Debug, PartialEq, Eq)]
pub struct QapiEnum {
    /// The type's name (`QMPCapability`).
    pub name: &'static str,
    /// Its values, in declaration order.
    pub values: &'static [&'static str],
}

impl ArgType {
    fn expected(self) -> &'static str {
        match self {
            ArgType::Str => "string",
            ArgType::Bool => "boolean",
            ArgType::Int => "integer",
            ArgType::Any => "any",
            ArgType::Enum(_) => "string",
            ArgType::EnumList(_) => "array",
        }
    }
}

/// One declared argument.
#[derive(Clone, Copy, Debug)]
pub struct Arg {
    /// Its name.
    pub name: &'static str,
    /// Its type.
    pub ty: ArgType,
    /// Whether it must be given.
    pub required: bool,
}

/// The name of [`Arg::rest`].
const REST: &str = "*";

impl Arg {
    /// A required argument.
    pub const fn required(name: &'static str, ty: ArgType) -> Arg {
        Arg {
            name,
            ty,
            required: true,
        }
    }
    /// An optional argument.
    pub const fn optional(name: &'static str, ty: ArgType) -> Arg {
        Arg {
            name,
            ty,
            required: false,
        }
    }
    /// Members the command checks itself: the branch of a QAPI union (`object-add`'s
    /// members depend on its `qom-type`). Undeclared members are then let through.
    pub const fn rest() -> Arg {
        Arg {
            name: REST,
            ty: ArgType::Any,
            required: false,
        }
    }
    /// Whether this is [`Arg::rest`].
    pub fn is_rest(&self) -> bool {
        self.name == REST
    }
}

/// What a command runs with.
pub struct CommandCtx<'a> {
    /// The VM.
    pub vm: &'a VmContext,
    /// An action for after the reply (`quit`).
    pub deferred: Cell<Option<Deferred>>,
    /// Descriptors the client passed and `getfd` may name (QMP on a Unix socket).
    pub fds: Option<crate::monitor::fds::FdQueue>,
}

impl<'a> CommandCtx<'a> {
    /// A context with nothing deferred.
    pub fn new(vm: &'a VmContext) -> Self {
        CommandCtx {
            vm,
            deferred: Cell::new(None),
            fds: None,
        }
    }
}

/// A command's implementation: checked arguments in, the `return` value out.
pub type CommandFn = fn(&CommandCtx, &Map<String, Value>) -> Result<Value, QmpError>;

/// A QMP command (QEMU's `QmpCommand`).
pub struct QmpCommand {
    /// The command's name.
    pub name: &'static str,
    /// Its arguments.
    pub args: &'static [Arg],
    /// Its implementation.
    pub run: CommandFn,
}

/// The capabilities QMP knows (QEMU's `QMPCapability`).
const CAPABILITIES: QapiEnum = QapiEnum {
    name: "QMPCapability",
    values: &["oob"],
};

/// `qmp_capabilities`' arguments (the session runs it; `qmp_cmds` lists it).
pub const QMP_CAPABILITIES_ARGS: &[Arg] =
    &[Arg::optional("enable", ArgType::EnumList(&CAPABILITIES))];

/// A QMP event (QEMU's `{ 'event': ... }`): its name and its `data` members.
pub struct QmpEvent {
    /// The event's name.
    pub name: &'static str,
    /// Its data members.
    pub data: &'static [Arg],
}

/// QEMU's `MigrationStatus`, the `status` of `MIGRATION`.
pub const MIGRATION_STATUS: QapiEnum = QapiEnum {
    name: "MigrationStatus",
    values: crate::migration::MIGRATION_STATUS_VALUES,
};

/// QEMU's `ShutdownCause`, the `reason` of `SHUTDOWN` and `RESET`: the causes qomvm has
/// (`hw::core::runstate::ShutdownCause`), in QEMU's order.
pub const SHUTDOWN_CAUSE: QapiEnum = QapiEnum {
    name: "ShutdownCause",
    values: &[
        "host-error",
        "host-qmp-quit",
        "host-qmp-system-reset",
        "host-signal",
        "host-ui",
        "guest-shutdown",
        "guest-reset",
        "guest-panic",
    ],
};

/// QAPI's `GuestPanicAction`, the `action` of `GUEST_PANICKED` and `GUEST_CRASHLOADED`.
pub const GUEST_PANIC_ACTION: QapiEnum = QapiEnum {
    name: "GuestPanicAction",
    values: &["pause", "poweroff", "run"],
};

/// QAPI's `WatchdogAction`, `watchdog-set-action`'s argument and `WATCHDOG`'s `action`.
pub const WATCHDOG_ACTION: QapiEnum = QapiEnum {
    name: "WatchdogAction",
    values: &[
        "reset",
        "shutdown",
        "poweroff",
        "pause",
        "debug",
        "none",
        "inject-nmi",
    ],
};

/// The VNC events' members: QAPI's `VncServerInfo` and `VncBasicInfo` (or `VncClientInfo`).
const VNC_EVENT_DATA: &[Arg] = &[
    Arg::required("server", ArgType::Any),
    Arg::required("client", ArgType::Any),
];

/// Every event qomvm sends, as `query-qmp-schema` describes them; a message for an event
/// not declared here is a bug (`client::event_message` checks in debug builds).
pub const EVENTS: &[QmpEvent] = &[
    QmpEvent {
        name: "SHUTDOWN",
        data: &[
            Arg::required("guest", ArgType::Bool),
            Arg::required("reason", ArgType::Enum(&SHUTDOWN_CAUSE)),
        ],
    },
    QmpEvent {
        name: "POWERDOWN",
        data: &[],
    },
    QmpEvent {
        name: "RESET",
        data: &[
            Arg::required("guest", ArgType::Bool),
            Arg::required("reason", ArgType::Enum(&SHUTDOWN_CAUSE)),
        ],
    },
    QmpEvent {
        name: "STOP",
        data: &[],
    },
    QmpEvent {
        name: "MIGRATION",
        data: &[Arg::required("status", ArgType::Enum(&MIGRATION_STATUS))],
    },
    QmpEvent {
        name: "DUMP_COMPLETED",
        data: &[
            Arg::required("result", ArgType::Any),
            Arg::optional("error", ArgType::Str),
        ],
    },
    QmpEvent {
        name: "MIGRATION_PASS",
        data: &[Arg::required("pass", ArgType::Int)],
    },
    QmpEvent {
        name: "VNC_CONNECTED",
        data: VNC_EVENT_DATA,
    },
    QmpEvent {
        name: "VNC_INITIALIZED",
        data: VNC_EVENT_DATA,
    },
    QmpEvent {
        name: "VNC_DISCONNECTED",
        data: VNC_EVENT_DATA,
    },
    QmpEvent {
        name: "RESUME",
        data: &[],
    },
    QmpEvent {
        name: "SUSPEND",
        data: &[],
    },
    QmpEvent {
        name: "SUSPEND_DISK",
        data: &[],
    },
    QmpEvent {
        name: "WAKEUP",
        data: &[],
    },
    QmpEvent {
        name: "GUEST_PANICKED",
        data: &[Arg::required("action", ArgType::Enum(&GUEST_PANIC_ACTION))],
    },
    QmpEvent {
        name: "WATCHDOG",
        data: &[Arg::required("action", ArgType::Enum(&WATCHDOG_ACTION))],
    },
    QmpEvent {
        name: "RTC_CHANGE",
        data: &[
            Arg::required("offset", ArgType::Int),
            Arg::required("qom-path", ArgType::Str),
        ],
    },
    QmpEvent {
        name: "GUEST_CRASHLOADED",
        data: &[Arg::required("action", ArgType::Enum(&GUEST_PANIC_ACTION))],
    },
    QmpEvent {
        name: "BALLOON_CHANGE",
        data: &[Arg::required("actual", ArgType::Int)],
    },
    QmpEvent {
        name: "VSERPORT_CHANGE",
        data: &[
            Arg::required("id", ArgType::Str),
            Arg::required("open", ArgType::Bool),
        ],
    },
    QmpEvent {
        name: "DEVICE_DELETED",
        data: &[
            Arg::optional("device", ArgType::Str),
            Arg::required("path", ArgType::Str),
        ],
    },
    QmpEvent {
        name: "DEVICE_TRAY_MOVED",
        data: &[
            Arg::required("device", ArgType::Str),
            Arg::required("id", ArgType::Str),
            Arg::required("tray-open", ArgType::Bool),
        ],
    },
    QmpEvent {
        name: "NIC_RX_FILTER_CHANGED",
        data: &[
            Arg::optional("name", ArgType::Str),
            Arg::required("path", ArgType::Str),
        ],
    },
];

/// QAPI's argument checks, in its order: the declared members (missing, wrong type), then
/// anything undeclared.
pub fn check_args(args: &Map<String, Value>, spec: &[Arg]) -> Result<(), QmpError> {
    for arg in spec.iter().filter(|a| a.name != REST) {
        match args.get(arg.name) {
            None if arg.required => return Err(QmpError::MissingParameter(arg.name.into())),
            None => {}
            Some(v) => {
                let ok = match arg.ty {
                    ArgType::Str => v.is_string(),
                    ArgType::Bool => v.is_boolean(),
                    ArgType::Int => v.is_i64() || v.is_u64(),
                    ArgType::Any => true,
                    ArgType::Enum(e) => match v.as_str() {
                        Some(s) if e.values.contains(&s) => true,
                        Some(s) => {
                            return Err(QmpError::InvalidEnumValue {
                                name: arg.name.into(),
                                value: s.into(),
                            })
                        }
                        None => false,
                    },
                    ArgType::EnumList(e) => {
                        let names = e.values;
                        let Some(items) = v.as_array() else {
                            return Err(QmpError::InvalidParameterType {
                                name: arg.name.into(),
                                expected: "array",
                            });
                        };
                        for item in items {
                            let Some(s) = item.as_str() else {
                                return Err(QmpError::InvalidParameterType {
                                    name: format!("{}[0]", arg.name),
                                    expected: "string",
                                });
                            };
                            if !names.contains(&s) {
                                return Err(QmpError::InvalidEnumValue {
                                    name: arg.name.into(),
                                    value: s.into(),
                                });
                            }
                        }
                        true
                    }
                };
                if !ok {
                    return Err(QmpError::InvalidParameterType {
                        name: arg.name.into(),
                        expected: arg.ty.expected(),
                    });
                }
            }
        }
    }
    if spec.iter().any(|a| a.name == REST) {
        return Ok(());
    }
    if let Some(extra) = args
        .keys()
        .find(|k| !spec.iter().any(|a| a.name == k.as_str()))
    {
        return Err(QmpError::UnexpectedParameter(extra.clone()));
    }
    Ok(())
}

/// A QAPI `int` argument, `None` if absent. `check_args` lets through JSON numbers
/// beyond i64 (for `uint64` arguments): an `int` refuses them, as QEMU's input visitor.
pub fn int_arg(args: &Map<String, Value>, name: &str) -> Result<Option<i64>, QmpError> {
    args.get(name)
        .map(|v| {
            v.as_i64().ok_or_else(|| QmpError::InvalidParameterType {
                name: name.into(),
                expected: "integer",
            })
        })
        .transpose()
}
