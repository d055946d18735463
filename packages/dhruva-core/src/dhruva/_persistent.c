/* The C accelerator of dhruva.persistent: a drop-in for dhruva._persistent_py.
 *
 * It provides the same names (PersistentBase, ConnectionBase, the state
 * constants GHOST/SAVED/UNSAVED and _getattribute/_setattribute/_delattribute)
 * with the same behaviour, faster.
 *
 * Design: the common case of an attribute read is an object that is loaded and
 * was already stamped in the current transaction.  Each object keeps a pointer,
 * serial_source, to the transaction serial it must match: the serial field of
 * its ConnectionBase, or its own _p_serial when it has no connection (so it
 * always matches).  A read then costs one status test and one comparison
 * before the generic attribute lookup; the attribute name is only examined on
 * the slow path (a ghost, a first access in a transaction, or a connection
 * that is not a ConnectionBase).  A write checks the name prefix, and skips the
 * call to _p_note_change() when the object is already unsaved and its class
 * keeps the _p_note_change() defined here.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#ifndef Py_T_INT
#define Py_T_INT T_INT
#define Py_T_LONGLONG T_LONGLONG
#define Py_T_OBJECT_EX T_OBJECT_EX
#define Py_READONLY READONLY
#endif

#define STATUS_GHOST -1
#define STATUS_SAVED 0
#define STATUS_UNSAVED 1

static PyObject *str_p_load_state;
static PyObject *str_p_note_change;
static PyObject *str_p_set_status_unsaved;
static PyObject *str_p_connection;
static PyObject *str_note_access;
static PyObject *str_note_change;
static PyObject *str_transaction_serial;
static PyObject *str_class;
static PyObject *str_repr;
static PyObject *str_setstate;

/* The _p_note_change method descriptor of PersistentBase, compared against
 * what a class resolves the name to. */
static PyObject *default_note_change;

static PyObject *empty_tuple;

/* --- ConnectionBase ------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    long long transaction_serial;
} ConnectionBaseObject;

static PyObject *
connection_base_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    ConnectionBaseObject *self = (ConnectionBaseObject *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->transaction_serial = 1;
    }
    return (PyObject *)self;
}

static void
connection_base_dealloc(PyObject *self)
{
    Py_TYPE(self)->tp_free(self);
}

static PyMemberDef connection_base_members[] = {
    {"transaction_serial", Py_T_LONGLONG,
     offsetof(ConnectionBaseObject, transaction_serial), 0,
     "Counts commits and aborts; objects stamp it on access."},
    {NULL},
};

static PyTypeObject ConnectionBase_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dhruva._persistent.ConnectionBase",
    .tp_basicsize = sizeof(ConnectionBaseObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "The part of a Connection that persistent objects touch on "
              "every access.",
    .tp_new = connection_base_new,
    .tp_dealloc = connection_base_dealloc,
    .tp_members = connection_base_members,
};

/* --- PersistentBase ------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    int status;
    long long serial;
    PyObject *connection;
    PyObject *oid;
    /* The serial to match: the connection's, our own when the connection is
     * None, NULL when it must be looked up (not a ConnectionBase, or unset). */
    long long *serial_source;
} PersistentBaseObject;

static void
set_serial_source(PersistentBaseObject *self)
{
    PyObject *connection = self->connection;
    if (connection == Py_None) {
        self->serial_source = &self->serial;
    }
    else if (connection != NULL &&
             PyObject_TypeCheck(connection, &ConnectionBase_Type)) {
        self->serial_source =
            &((ConnectionBaseObject *)connection)->transaction_serial;
    }
    else {
        self->serial_source = NULL;
    }
}

static PyObject *
persistent_base_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    /* object.__new__ allocates and, for a class with an instance dict, sets
     * up the compact shared-key layout that plain objects get. */
    PersistentBaseObject *self = (PersistentBaseObject *)PyBaseObject_Type.tp_new(
        type, empty_tuple, NULL);
    if (self == NULL) {
        return NULL;
    }
    self->status = STATUS_UNSAVED;
    self->serial = 0;
    self->connection = Py_NewRef(Py_None);
    self->oid = Py_NewRef(Py_None);
    self->serial_source = &self->serial;
    return (PyObject *)self;
}

static int
persistent_base_traverse(PersistentBaseObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->connection);
    Py_VISIT(self->oid);
    return 0;
}

static int
persistent_base_clear(PersistentBaseObject *self)
{
    self->serial_source = NULL;
    Py_CLEAR(self->connection);
    Py_CLEAR(self->oid);
    return 0;
}

static void
persistent_base_dealloc(PersistentBaseObject *self)
{
    PyObject_GC_UnTrack(self);
    persistent_base_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* True when name[:3] == "_p_". */
static inline int
is_p_name(PyObject *name)
{
    if (!PyUnicode_Check(name) || PyUnicode_GET_LENGTH(name) < 3) {
        return 0;
    }
    int kind = PyUnicode_KIND(name);
    const void *data = PyUnicode_DATA(name);
    return (PyUnicode_READ(kind, data, 0) == '_' &&
            PyUnicode_READ(kind, data, 1) == 'p' &&
            PyUnicode_READ(kind, data, 2) == '_');
}

/* True when reading this name must load a ghost and stamp the access. */
static int
is_hooked_name(PyObject *name)
{
    if (!PyUnicode_Check(name) || is_p_name(name)) {
        return 0;
    }
    if (name == str_class || name == str_repr || name == str_setstate) {
        return 0;
    }
    return !(PyUnicode_Compare(name, str_class) == 0 ||
             PyUnicode_Compare(name, str_repr) == 0 ||
             PyUnicode_Compare(name, str_setstate) == 0);
}

/* Call connection.note_access(self) when _p_serial differs from the
 * connection's transaction serial.  Returns -1 with an exception set. */
static int
stamp_access(PersistentBaseObject *self)
{
    PyObject *connection = self->connection;
    if (connection == NULL) {
        PyErr_SetString(PyExc_AttributeError, "_p_connection");
        return -1;
    }
    if (connection == Py_None) {
        return 0;
    }
    int differs;
    if (self->serial_source != NULL) {
        differs = *self->serial_source != self->serial;
    }
    else {
        PyObject *current = PyObject_GetAttr(connection, str_transaction_serial);
        if (current == NULL) {
            return -1;
        }
        PyObject *serial = PyLong_FromLongLong(self->serial);
        if (serial == NULL) {
            Py_DECREF(current);
            return -1;
        }
        differs = PyObject_RichCompareBool(serial, current, Py_NE);
        Py_DECREF(serial);
        Py_DECREF(current);
        if (differs < 0) {
            return -1;
        }
    }
    if (differs) {
        Py_INCREF(connection);
        PyObject *result =
            PyObject_CallMethodOneArg(connection, str_note_access, (PyObject *)self);
        Py_DECREF(connection);
        if (result == NULL) {
            return -1;
        }
        Py_DECREF(result);
    }
    return 0;
}

static PyObject *
persistent_base_getattro_slow(PersistentBaseObject *self, PyObject *name)
{
    if (is_hooked_name(name)) {
        if (self->status == STATUS_GHOST) {
            PyObject *result =
                PyObject_CallMethodNoArgs((PyObject *)self, str_p_load_state);
            if (result == NULL) {
                return NULL;
            }
            Py_DECREF(result);
        }
        if (stamp_access(self) < 0) {
            return NULL;
        }
    }
    return PyObject_GenericGetAttr((PyObject *)self, name);
}

static PyObject *
persistent_base_getattro(PersistentBaseObject *self, PyObject *name)
{
    long long *source = self->serial_source;
    if (self->status != STATUS_GHOST && source != NULL &&
        *source == self->serial) {
        return PyObject_GenericGetAttr((PyObject *)self, name);
    }
    return persistent_base_getattro_slow(self, name);
}

/* Handles both setting (value != NULL) and deleting (value == NULL). */
static int
persistent_base_setattro(PersistentBaseObject *self, PyObject *name,
                         PyObject *value)
{
    if (!is_p_name(name) && PyUnicode_Check(name)) {
        /* The default _p_note_change() does nothing on an unsaved object. */
        if (self->status != STATUS_UNSAVED ||
            _PyType_Lookup(Py_TYPE(self), str_p_note_change) !=
                default_note_change) {
            PyObject *result =
                PyObject_CallMethodNoArgs((PyObject *)self, str_p_note_change);
            if (result == NULL) {
                return -1;
            }
            Py_DECREF(result);
        }
    }
    return PyObject_GenericSetAttr((PyObject *)self, name, value);
}

static PyObject *
persistent_base_note_change(PersistentBaseObject *self, PyObject *unused)
{
    if (self->status != STATUS_UNSAVED) {
        PyObject *result =
            PyObject_CallMethodNoArgs((PyObject *)self, str_p_set_status_unsaved);
        if (result == NULL) {
            return NULL;
        }
        Py_DECREF(result);
        PyObject *connection = self->connection;
        if (connection == NULL) {
            PyErr_SetObject(PyExc_AttributeError, str_p_connection);
            return NULL;
        }
        if (connection != Py_None) {
            Py_INCREF(connection);
            result = PyObject_CallMethodOneArg(connection, str_note_change,
                                               (PyObject *)self);
            Py_DECREF(connection);
            if (result == NULL) {
                return NULL;
            }
            Py_DECREF(result);
        }
    }
    Py_RETURN_NONE;
}

static PyObject *
persistent_base_get_connection(PersistentBaseObject *self, void *closure)
{
    if (self->connection == NULL) {
        PyErr_SetObject(PyExc_AttributeError, str_p_connection);
        return NULL;
    }
    return Py_NewRef(self->connection);
}

static int
persistent_base_set_connection(PersistentBaseObject *self, PyObject *value,
                               void *closure)
{
    if (value == NULL && self->connection == NULL) {
        PyErr_SetObject(PyExc_AttributeError, str_p_connection);
        return -1;
    }
    Py_XSETREF(self->connection, Py_XNewRef(value));
    set_serial_source(self);
    return 0;
}

static PyMethodDef persistent_base_methods[] = {
    {"_p_note_change", (PyCFunction)persistent_base_note_change, METH_NOARGS,
     "Mark this object changed, so the next commit stores it."},
    {NULL},
};

static PyMemberDef persistent_base_members[] = {
    {"_p_status", Py_T_INT, offsetof(PersistentBaseObject, status), 0,
     "GHOST, SAVED or UNSAVED."},
    {"_p_serial", Py_T_LONGLONG, offsetof(PersistentBaseObject, serial), 0,
     "The connection's transaction serial at the last access."},
    {"_p_oid", Py_T_OBJECT_EX, offsetof(PersistentBaseObject, oid), 0,
     "The object id, or None before the first commit."},
    {NULL},
};

static PyGetSetDef persistent_base_getset[] = {
    {"_p_connection", (getter)persistent_base_get_connection,
     (setter)persistent_base_set_connection,
     "The connection that loaded or stored this object, or None.", NULL},
    {NULL},
};

static PyTypeObject PersistentBase_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dhruva._persistent.PersistentBase",
    .tp_basicsize = sizeof(PersistentBaseObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Slots and attribute hooks shared by every persistent object.",
    .tp_new = persistent_base_new,
    .tp_dealloc = (destructor)persistent_base_dealloc,
    .tp_traverse = (traverseproc)persistent_base_traverse,
    .tp_clear = (inquiry)persistent_base_clear,
    .tp_getattro = (getattrofunc)persistent_base_getattro,
    .tp_setattro = (setattrofunc)persistent_base_setattro,
    .tp_methods = persistent_base_methods,
    .tp_members = persistent_base_members,
    .tp_getset = persistent_base_getset,
};

/* --- module functions ---------------------------------------------------- */

static PyObject *
module_getattribute(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError,
                     "_getattribute() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    return PyObject_GenericGetAttr(args[0], args[1]);
}

static PyObject *
module_setattribute(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError,
                     "_setattribute() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    if (PyObject_GenericSetAttr(args[0], args[1], args[2]) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
module_delattribute(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError,
                     "_delattribute() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    if (PyObject_GenericSetAttr(args[0], args[1], NULL) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"_getattribute", (PyCFunction)(void (*)(void))module_getattribute,
     METH_FASTCALL, "Read an attribute without the persistent hooks."},
    {"_setattribute", (PyCFunction)(void (*)(void))module_setattribute,
     METH_FASTCALL, "Set an attribute without the persistent hooks."},
    {"_delattribute", (PyCFunction)(void (*)(void))module_delattribute,
     METH_FASTCALL, "Delete an attribute without the persistent hooks."},
    {NULL},
};

static struct PyModuleDef persistent_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "dhruva._persistent",
    .m_doc = "The C accelerator of dhruva.persistent (see dhruva._persistent_py).",
    .m_size = -1,
    .m_methods = module_methods,
};

static int
intern_strings(void)
{
#define INTERN(var, text)                                  \
    if ((var = PyUnicode_InternFromString(text)) == NULL) { \
        return -1;                                         \
    }
    INTERN(str_p_load_state, "_p_load_state");
    INTERN(str_p_note_change, "_p_note_change");
    INTERN(str_p_set_status_unsaved, "_p_set_status_unsaved");
    INTERN(str_p_connection, "_p_connection");
    INTERN(str_note_access, "note_access");
    INTERN(str_note_change, "note_change");
    INTERN(str_transaction_serial, "transaction_serial");
    INTERN(str_class, "__class__");
    INTERN(str_repr, "__repr__");
    INTERN(str_setstate, "__setstate__");
#undef INTERN
    return 0;
}

PyMODINIT_FUNC
PyInit__persistent(void)
{
    if (intern_strings() < 0) {
        return NULL;
    }
    if (empty_tuple == NULL && (empty_tuple = PyTuple_New(0)) == NULL) {
        return NULL;
    }
    if (PyType_Ready(&ConnectionBase_Type) < 0 ||
        PyType_Ready(&PersistentBase_Type) < 0) {
        return NULL;
    }
    default_note_change = _PyType_Lookup(&PersistentBase_Type, str_p_note_change);
    if (default_note_change == NULL) {
        PyErr_SetString(PyExc_SystemError, "_p_note_change is missing");
        return NULL;
    }
    Py_INCREF(default_note_change);

    PyObject *module = PyModule_Create(&persistent_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddIntConstant(module, "GHOST", STATUS_GHOST) < 0 ||
        PyModule_AddIntConstant(module, "SAVED", STATUS_SAVED) < 0 ||
        PyModule_AddIntConstant(module, "UNSAVED", STATUS_UNSAVED) < 0 ||
        PyModule_AddObjectRef(module, "ConnectionBase",
                              (PyObject *)&ConnectionBase_Type) < 0 ||
        PyModule_AddObjectRef(module, "PersistentBase",
                              (PyObject *)&PersistentBase_Type) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
